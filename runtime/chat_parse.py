"""Parsing DeepSeek-V4 completions back into reasoning, content and tool calls.

The completion is the text the model writes after the prompt built by ``chat.encode_messages``:

    thinking mode:  {reasoning}</think>{content}{tool calls}<｜end▁of▁sentence｜>
    chat mode:      {content}{tool calls}<｜end▁of▁sentence｜>

where {tool calls} is empty or a blank line and a ``<｜DSML｜tool_calls>`` block.

One incremental state machine (``ChatStreamParser``) does all the work; ``parse_completion`` feeds
it the whole text at once, so streaming and one-shot parsing agree for any split of the text.
The parser is best-effort: malformed markup never reaches ``content`` or ``reasoning_content``,
each irregularity is recorded in ``problems``, and ``parse_completion(strict=True)`` turns the
first one into a ``DsvError``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

from dsv4.runtime.errors import DsvError

# Special strings (full-width bar U+FF5C, U+2581 in the sentence tokens). Each is one token id.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments_json: str  # a JSON object, in the same spelling the official decoder produces


@dataclass(frozen=True)
class End:
    eos: bool  # True when <｜end▁of▁sentence｜> was seen, False when the text just stopped


Event = Union[ReasoningDelta, ContentDelta, ToolCall, End]

# Tokens that are dropped when they appear inside reasoning or content (they are never text).
_STRAY = (BOS, THINK_START)
# Every string whose beginning, at the end of the buffer, must be held back in a text state.
_DSML_FORMS = tuple(nl + lt + DSML for nl in ("\n\n", "") for lt in ("</", "<", ""))
_TEXT_HOLD = (EOS, BOS, THINK_START, THINK_END) + _DSML_FORMS
_TRAILER_HOLD = (EOS, TOOL_CALLS_OPEN)

_INVOKE_OPEN_RE = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>')
_VALUE = rf"((?:(?!{DSML}).)*?)"  # a parameter value never contains DSML markup
_PARAM_RE = re.compile(
    rf'<{DSML}parameter\s+name="([^"]*)"(?:\s+string="([^"]*)")?\s*>{_VALUE}{PARAM_CLOSE}', re.S)
_CANON_PARAM = rf'<{DSML}parameter name="[^"]*" string="(?:true|false)">{_VALUE}{PARAM_CLOSE}\n'
_CANON_INVOKE_RE = re.compile(
    rf'\n<{DSML}invoke name="[^"]*">\n(?:\n|(?:{_CANON_PARAM})*){INVOKE_CLOSE}', re.S)

_REASONING, _CONTENT, _TOOLS, _TRAILER, _DONE = range(5)
_DROPPED = "text in the DSML block that is not a complete tool call was dropped"


def _held(buf: str, markers: tuple[str, ...], end: int | None = None) -> int:
    """Length of the longest suffix of buf[:end] that is a proper prefix of one of the markers."""
    end = len(buf) if end is None else end
    n = 0
    for m in markers:
        for k in range(min(end, len(m) - 1), n, -1):
            if buf.endswith(m[:k], 0, end):
                n = k
                break
    return n


def _text_held(buf: str, strays: tuple[str, ...]) -> int:
    """What a text state must keep back. Stray tokens are cut out of the text, so the text before
    an unfinished stray token may still join what follows it into a marker: keep that too."""
    keep, end = _held(buf, _TEXT_HOLD), len(buf)
    while True:
        q = _held(buf, strays, end)  # an unfinished stray token ending at `end`
        if q == 0:
            return keep
        end -= q
        keep = max(keep, len(buf) - end + _held(buf, _TEXT_HOLD, end))


def _to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _reject_constant(name: str):
    raise ValueError(name)


def _decode_value(raw: str, string_attr: str | None, problems: list[str]) -> str:
    """One DSML parameter value as a JSON text."""
    if string_attr == "true":
        return _to_json(raw)
    try:
        json.loads(raw, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except ValueError:
        if string_attr == "false":
            problems.append("a string=\"false\" parameter is not valid JSON; kept as a string")
        return _to_json(raw)
    if string_attr != "false":
        problems.append("a DSML parameter lacks string=\"true|false\"; guessed from its value")
    return raw


def _parse_invoke(segment: str, problems: list[str]) -> ToolCall | None:
    """One ``<｜DSML｜invoke ...>...</｜DSML｜invoke>`` segment (leading separator included)."""
    heads = list(_INVOKE_OPEN_RE.finditer(segment))
    if len(heads) > 1:
        problems.append("an unterminated DSML invoke was dropped")
    head = heads[-1] if heads else None
    if head is None or not head.group(1):
        problems.append("a DSML invoke without a tool name was dropped")
        return None
    if len(heads) == 1 and segment[:head.start()].strip():
        problems.append("text between DSML invokes was ignored")
    if _CANON_INVOKE_RE.fullmatch(segment) is None:
        problems.append("DSML invoke layout differs from the canonical one")
    body = segment[head.end():len(segment) - len(INVOKE_CLOSE)]
    args: dict[str, str] = {}
    pos = 0
    for m in _PARAM_RE.finditer(body):
        if body[pos:m.start()].strip():
            problems.append("text between DSML parameters was ignored")
        pos = m.end()
        key, attr, raw = m.group(1), m.group(2), m.group(3)
        if attr not in (None, "true", "false"):
            problems.append(f"DSML parameter {key!r} has string={attr!r}; guessed from its value")
            attr = None
        if key in args:
            problems.append(f"duplicate DSML parameter {key!r}; the first one is kept")
            continue
        args[key] = _decode_value(raw, attr, problems)
    if body[pos:].strip():
        problems.append("an unterminated DSML parameter was ignored")
    arguments = "{" + ", ".join(f"{_to_json(k)}: {v}" for k, v in args.items()) + "}"
    return ToolCall(name=head.group(1), arguments_json=arguments)


class ChatStreamParser:
    """Incremental completion parser: ``feed`` text pieces, then ``finish`` once.

    Deltas are emitted as soon as they cannot be the beginning of a special marker; a tool call
    is emitted when its ``</｜DSML｜invoke>`` arrives. The concatenated deltas equal the fields
    of ``parse_completion`` for any way of splitting the same text.
    """

    def __init__(self, thinking: bool):
        self.thinking = bool(thinking)
        self._state = _REASONING if self.thinking else _CONTENT
        self._buf = ""
        self._opened = False  # saw <｜DSML｜tool_calls> for the current block
        self._finished = False
        self._problems: list[str] = []

    @property
    def problems(self) -> tuple[str, ...]:
        """Irregularities seen so far, in order, each once."""
        return tuple(dict.fromkeys(self._problems))

    def feed(self, piece: str) -> list[Event]:
        if self._finished:
            raise DsvError("chat: ChatStreamParser.feed() called after finish()")
        if not isinstance(piece, str):
            raise DsvError(f"chat: feed() expects text, got {type(piece).__name__}")
        self._buf += piece
        return self._run(final=False)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        events = self._run(final=True)
        self._finished = True
        if self._state == _REASONING:
            self._problems.append("the completion ended inside the reasoning (no </think>)")
        elif self._state == _TOOLS:
            self._problems.append("the completion ended inside a DSML tool_calls block")
        if self._state != _DONE:
            self._state = _DONE
            events.append(End(eos=False))
        return events

    # -- the state machine ---------------------------------------------------------------------
    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        step = {_REASONING: self._step_text, _CONTENT: self._step_text,
                _TOOLS: self._step_tools, _TRAILER: self._step_trailer, _DONE: self._step_done}
        while step[self._state](out, final):
            pass
        return _coalesce(out)

    def _emit_text(self, out: list[Event], text: str) -> None:
        if text:
            out.append(ReasoningDelta(text) if self._state == _REASONING else ContentDelta(text))

    def _step_text(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        best = None  # (text_end, rest_start, kind)
        strays = _STRAY if self._state == _REASONING else _STRAY + (THINK_END,)
        found = ((EOS, "eos"), (THINK_END, "think_end")) + tuple((t, "stray") for t in _STRAY)
        for tok, kind in found:
            i = buf.find(tok)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(tok), kind)
        j = buf.find(DSML)
        if j >= 0:
            markup = j - 2 if buf[:j].endswith("</") else j - 1 if buf[:j].endswith("<") else j
            gap = buf[:markup].endswith("\n\n")
            text_end = markup - 2 if gap else markup
            if best is None or text_end < best[0]:
                best = (text_end, markup, "dsml" if gap else "dsml_nogap")
        if best is None:
            keep = 0 if final else _text_held(buf, strays)
            self._emit_text(out, buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        text_end, rest, kind = best
        where = "reasoning" if self._state == _REASONING else "content"
        if kind == "stray" or (kind == "think_end" and self._state == _CONTENT):
            # Cut the token out and rescan: the text around it may still form a marker.
            self._problems.append(f"a stray special token in the {where} was dropped")
            self._buf = buf[:text_end] + buf[rest:]
            return True
        self._emit_text(out, buf[:text_end])
        self._buf = buf[rest:]
        if kind == "eos":
            if self._state == _REASONING:
                self._problems.append("the reasoning was not closed by </think> before the end")
            self._state = _DONE
            out.append(End(eos=True))
        elif kind == "think_end":
            self._state = _CONTENT
        else:
            if self._state == _REASONING:
                self._problems.append("tool calls began inside the reasoning (no </think>)")
            if kind == "dsml_nogap":
                self._problems.append("tool calls are not preceded by a blank line")
            self._state, self._opened = _TOOLS, False
        return True

    def _step_tools(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        if not self._opened:
            if buf.startswith(TOOL_CALLS_OPEN):
                self._buf, self._opened = buf[len(TOOL_CALLS_OPEN):], True
                return True
            if TOOL_CALLS_OPEN.startswith(buf) and not final:
                return False
            self._problems.append("DSML markup without an opening <｜DSML｜tool_calls>")
            self._opened = True
            return True
        best = None
        for tok in (INVOKE_CLOSE, TOOL_CALLS_CLOSE, EOS):
            i = buf.find(tok)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, tok)
        if best is None:
            if final and buf.strip():
                self._problems.append(_DROPPED)
                self._buf = ""
            return False
        i, tok = best
        self._buf = buf[i + len(tok):]
        if tok == INVOKE_CLOSE:
            call = _parse_invoke(buf[:i + len(tok)], self._problems)
            if call is not None:
                out.append(call)
            return True
        if buf[:i] != "\n":
            self._problems.append(_DROPPED if buf[:i].strip() else
                                  "DSML tool_calls block layout differs from the canonical one")
        if tok == EOS:
            self._problems.append("the DSML tool_calls block was not closed")
            self._state = _DONE
            out.append(End(eos=True))
        else:
            self._state = _TRAILER
        return True

    def _step_trailer(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        best = None
        for tok in _TRAILER_HOLD:
            i = buf.find(tok)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, tok)
        cut = best[0] if best else len(buf) - (0 if final else _held(buf, _TRAILER_HOLD))
        if buf[:cut]:
            self._problems.append("text after the tool calls was ignored")
        if best is None:
            self._buf = buf[cut:]
            return False
        i, tok = best
        if tok == EOS:
            self._buf = buf[i + len(EOS):]
            self._state = _DONE
            out.append(End(eos=True))
        else:
            self._problems.append("a second DSML tool_calls block follows the first")
            self._buf = buf[i:]
            self._state, self._opened = _TOOLS, False
        return True

    def _step_done(self, out: list[Event], final: bool) -> bool:
        if self._buf:
            self._problems.append("text after <｜end▁of▁sentence｜> was ignored")
            self._buf = ""
        return False


def _coalesce(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for ev in events:
        if out and type(ev) is type(out[-1]) and isinstance(ev, (ReasoningDelta, ContentDelta)):
            out[-1] = type(ev)(out[-1].text + ev.text)
        else:
            out.append(ev)
    return out


def stream_events(pieces: Iterable[str], *, thinking: bool) -> Iterator[Event]:
    """Parse a stream of decoded text pieces; yields events, the last one being ``End``."""
    parser = ChatStreamParser(thinking=thinking)
    for piece in pieces:
        yield from parser.feed(piece)
    yield from parser.finish()


def parse_completion(text: str, *, thinking: bool, strict: bool = False) -> dict:
    """``{"reasoning_content", "content", "tool_calls"}`` of one completion.

    ``reasoning_content`` is None in chat mode. Lenient by default (see the module docstring);
    with ``strict=True`` any irregularity raises ``DsvError``. A missing final
    ``<｜end▁of▁sentence｜>`` is not an irregularity.
    """
    if not isinstance(text, str):
        raise DsvError(f"chat: the completion must be text, got {type(text).__name__}")
    parser = ChatStreamParser(thinking=thinking)
    events = parser.feed(text) + parser.finish()
    if strict and parser.problems:
        raise DsvError(f"chat: malformed completion: {parser.problems[0]}")
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return {
        "reasoning_content": reasoning if parser.thinking else None,
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "tool_calls": [{"type": "function",
                        "function": {"name": e.name, "arguments": e.arguments_json}}
                       for e in events if isinstance(e, ToolCall)],
    }
