"""A multi-turn chat on top of `generate`: encode the history, stream parsed events.

Each turn encodes the whole conversation with the V4 prompt format and runs it from an
empty cache (the drop-thinking rule rewrites earlier turns, so the old prefix cannot simply
be extended). Generated text goes through `ChatStreamParser`; the assistant message it
yields is appended to the history.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

from .chat import encode_messages
from .chat_parse import EOS, ChatStreamParser, ContentDelta, End, ReasoningDelta, ToolCall
from .errors import DsvError
from .generate import GenerationConfig, GenerationStats, generate
from .model import Model
from .tokenizer import Tokenizer


@dataclass
class ChatOptions:
    thinking: bool = False
    reasoning_effort: str | None = None
    tools: list | None = None
    ctx: int | None = None                 # context length; default prompt + max_tokens


@dataclass
class ChatSession:
    model: Model
    tok: Tokenizer
    gen: GenerationConfig
    opts: ChatOptions = field(default_factory=ChatOptions)
    messages: list[dict] = field(default_factory=list)
    system: str | None = None
    last_stats: GenerationStats | None = None

    def __post_init__(self):
        if self.system is not None and not any(m.get("role") == "system" for m in self.messages):
            self.messages.insert(0, {"role": "system", "content": self.system})

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        prompt = encode_messages(self.messages, thinking=self.opts.thinking, tools=self.opts.tools,
                                 reasoning_effort=self.opts.reasoning_effort)
        return self.tok.encode(prompt, add_bos=False)

    def reply(self) -> Iterator[object]:
        """Generate the assistant's answer to the current history, yielding parser events
        (ReasoningDelta, ContentDelta, ToolCall, End); the message is then appended."""
        if not self.messages or self.messages[-1].get("role") == "assistant":
            raise DsvError("chat: the conversation must end with a user or tool message")
        ids = self.prompt_ids()
        capacity = self.opts.ctx or len(ids) + self.gen.max_tokens
        if len(ids) > capacity:
            raise DsvError(f"the conversation has {len(ids)} tokens, more than the context "
                           f"length {capacity} (raise --ctx or /reset)")
        parser = ChatStreamParser(self.opts.thinking)
        stats = GenerationStats()
        reasoning, content, calls = [], [], []

        def collect(events):
            for ev in events:
                if isinstance(ev, ReasoningDelta):
                    reasoning.append(ev.text)
                elif isinstance(ev, ContentDelta):
                    content.append(ev.text)
                elif isinstance(ev, ToolCall):
                    calls.append(ev)
                yield ev

        cache = self.model.new_cache(capacity)
        for piece in generate(self.model, self.tok, ids, self.gen, cache=cache, stats=stats):
            yield from collect(parser.feed(piece))
        if stats.stop_reason == "eos":
            yield from collect(parser.feed(EOS))
        yield from collect(parser.finish())
        self.last_stats = stats
        msg: dict = {"role": "assistant", "content": "".join(content)}
        if self.opts.thinking:
            msg["reasoning_content"] = "".join(reasoning)
        if calls:
            msg["tool_calls"] = [{"type": "function", "function": {
                "name": c.name, "arguments": c.arguments_json}} for c in calls]
        self.messages.append(msg)

    def ask(self, text: str) -> Iterator[object]:
        self.messages.append({"role": "user", "content": text})
        return self.reply()


def load_messages(path: str) -> tuple[list[dict], list | None]:
    """An OpenAI-style message list, or {"messages": [...], "tools": [...]}, from a JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DsvError(f"--messages {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DsvError(f"--messages {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        msgs, tools = data.get("messages"), data.get("tools")
    else:
        msgs, tools = data, None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DsvError(f"--messages {path}: expected a list of message objects "
                       "(or an object with 'messages' and optional 'tools')")
    return msgs, tools


__all__ = ["ChatOptions", "ChatSession", "load_messages", "End", "ToolCall", "ContentDelta",
           "ReasoningDelta"]
