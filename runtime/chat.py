"""DeepSeek-V4 chat prompts: OpenAI-style messages -> the prompt string the model was trained on.

The checkpoint ships no Jinja template; the format is defined by DeepSeek's reference encoder
(``encoding/encoding_dsv4.py`` of the V4 model repository). This is an independent
implementation of the same rules; docs/chat.md lists them. Parsing completions lives in
chat_parse.py and is re-exported here.

Pipeline: validate -> normalise (our own small dicts, the input is never mutated) -> fold tool
results into user turns -> order tool results like the calls -> drop old reasoning -> render.
"""
from __future__ import annotations

import json
from typing import Any

from dsv4.runtime.chat_parse import (  # noqa: F401  (re-exported API)
    ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER,
    ChatStreamParser, ContentDelta, End, Event, ReasoningDelta, ToolCall, parse_completion,
    stream_events)
from dsv4.runtime.errors import DsvError

ROLES = ("system", "user", "assistant", "tool", "latest_reminder", "developer")
REASONING_EFFORTS = (None, "high", "max")  # only "max" changes the prompt (thinking mode)
# Internal quick-instruction tasks of the reference encoder ("task" key of a message).
TASK_TOKENS = (("action", "<｜action｜>"), ("query", "<｜query｜>"), ("authority", "<｜authority｜>"),
               ("domain", "<｜domain｜>"), ("title", "<｜title｜>"), ("read_url", "<｜read_url｜>"))

# The prompt texts below are part of the trained format and must stay byte-exact.
_EFFORT_MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n")
_RESPONSE_FORMAT_HEAD = ("## Response Format:\n\nYou MUST strictly adhere to the following "
                         "schema to reply:\n")
_TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke "
    f"tools by writing a \"<{DSML}tool_calls>\" block like the following:\n\n"
    f"<{DSML}tool_calls>\n"
    f"<{DSML}invoke name=\"$TOOL_NAME\">\n"
    f"<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
    f"</{DSML}parameter>\n...\n"
    f"</{DSML}invoke>\n"
    f"<{DSML}invoke name=\"$TOOL_NAME2\">\n...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other "
    "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
    f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n")
_TOOLS_TAIL = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas "
               "to invoke tool calls.\n")


def _json(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise DsvError(f"chat: {where} is not JSON-serialisable ({err})") from None


# -- validation + normalisation ------------------------------------------------------------------
def _text(value: Any, where: str, *, allow_none: bool = False) -> str | None:
    """A message text: a string, or a list of OpenAI text parts (joined by a blank line)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise DsvError(f"chat: {where}[{i}] must be a {{'type': 'text', 'text': str}} part")
            parts.append(part["text"])
        return "\n\n".join(parts)
    raise DsvError(f"chat: {where} must be a string, got {type(value).__name__}")


def _functions(tools: Any, where: str) -> list[dict]:
    """OpenAI tool list -> the function dicts whose JSON goes into the prompt."""
    if not isinstance(tools, list):
        raise DsvError(f"chat: {where} must be a list of OpenAI function tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise DsvError(f"chat: {where}[{i}] is not an OpenAI function tool "
                           "({'type': 'function', 'function': {...}})")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DsvError(f"chat: {where}[{i}].function has no 'name'")
        _json(fn, f"{where}[{i}].function")
        out.append(fn)
    return out


def _arguments(args: Any, where: str) -> dict:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as err:
            raise DsvError(f"chat: {where}.arguments is not valid JSON ({err})") from None
    if not isinstance(args, dict):
        raise DsvError(f"chat: {where}.arguments must be a JSON object")
    _json(args, f"{where}.arguments")
    return args


def _calls(calls: Any, where: str) -> list[tuple[str, str, dict]]:
    """OpenAI tool_calls -> [(id, name, arguments dict)]."""
    if not isinstance(calls, list):
        raise DsvError(f"chat: {where} must be a list")
    out = []
    for i, call in enumerate(calls):
        w = f"{where}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise DsvError(f"chat: {w} has no 'function' object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or '"' in name:
            raise DsvError(f"chat: {w}.function.name must be a non-empty string without quotes")
        call_id = call.get("id") or fn.get("id") or ""
        out.append((str(call_id), name, _arguments(fn.get("arguments", "{}"), f"{w}.function")))
    return out


def _normalise(msg: Any, i: int) -> dict:
    w = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise DsvError(f"chat: {w} must be an object with a 'role'")
    role = msg.get("role")
    if role not in ROLES:
        raise DsvError(f"chat: {w} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    task = msg.get("task")
    if task is not None and task not in dict(TASK_TOKENS):
        raise DsvError(f"chat: {w}.task {task!r} is not one of {', '.join(dict(TASK_TOKENS))}")
    out: dict[str, Any] = {"role": role, "task": task}
    if role != "assistant" and "content" not in msg:
        raise DsvError(f"chat: {w} ({role}) has no 'content'")
    if msg.get("tools") is not None and role not in ("system", "developer"):
        raise DsvError(f"chat: {w}: 'tools' belongs on a system or developer message, not {role}")
    if msg.get("response_format") is not None and role not in ("system", "developer"):
        raise DsvError(f"chat: {w}: 'response_format' belongs on a system or developer message")
    if role == "assistant":
        out["content"] = _text(msg.get("content"), f"{w}.content", allow_none=True) or ""
        out["reasoning"] = _text(msg.get("reasoning_content"), f"{w}.reasoning_content",
                                 allow_none=True)
        out["calls"] = _calls(msg["tool_calls"], f"{w}.tool_calls") if msg.get("tool_calls") else []
        out["wo_eos"] = bool(msg.get("wo_eos", False))
    elif role == "tool":
        out["content"] = _text(msg["content"], f"{w}.content")
        out["call_id"] = str(msg.get("tool_call_id") or "")
    else:
        out["content"] = _text(msg["content"], f"{w}.content")
        if role == "developer" and not out["content"]:
            raise DsvError(f"chat: {w} (developer) has empty content")
    if role in ("system", "developer"):
        out["tools"] = _functions(msg["tools"], f"{w}.tools") if msg.get("tools") else []
        rf = msg.get("response_format")
        out["response_format"] = _json(rf, f"{w}.response_format") if rf else None
    return out


# -- the reference encoder's preprocessing -------------------------------------------------------
def _fold_tool_results(msgs: list[dict]) -> list[dict]:
    """Tool results join the user turn before them (or start one); consecutive user messages
    merge into one turn unless the earlier one carries a task. User turns become block lists."""
    out: list[dict] = []
    for m in msgs:
        prev_user = out[-1] if out and out[-1]["role"] == "user" else None
        if m["role"] == "tool":
            block = ("tool_result", m["call_id"], m["content"])
            if prev_user is not None:
                prev_user["blocks"].append(block)
            else:
                out.append({"role": "user", "task": None, "blocks": [block]})
        elif m["role"] == "user":
            block = ("text", "", m["content"])
            if prev_user is not None and prev_user["task"] is None:
                prev_user["blocks"].append(block)
            else:
                out.append({"role": "user", "task": m["task"], "blocks": [block]})
        else:
            out.append(m)
    return out


def _order_tool_results(msgs: list[dict]) -> None:
    """Within a user turn, tool results take the order of the latest assistant's calls (by id);
    results with unknown ids sort as position 0, ties keep their order; text blocks stay put."""
    order: dict[str, int] = {}
    for m in msgs:
        if m["role"] == "assistant" and m["calls"]:
            order = {cid: k for k, (cid, _, _) in enumerate(m["calls"]) if cid}
        elif m["role"] == "user" and order:
            slots = [k for k, b in enumerate(m["blocks"]) if b[0] == "tool_result"]
            if len(slots) > 1:
                ranked = sorted((m["blocks"][k] for k in slots), key=lambda b: order.get(b[1], 0))
                for k, block in zip(slots, ranked):
                    m["blocks"][k] = block


def _last_user(msgs: list[dict]) -> int:
    return max((k for k, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def _drop_old_reasoning(msgs: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose their reasoning, developer messages vanish."""
    last = _last_user(msgs)
    out = []
    for k, m in enumerate(msgs):
        if k >= last or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append(dict(m, reasoning=None))
    return out


# -- rendering -------------------------------------------------------------------------------------
def _tools_block(functions: list[dict]) -> str:
    schemas = "\n".join(json.dumps(fn, ensure_ascii=False) for fn in functions)
    return _TOOLS_HEAD + schemas + _TOOLS_TAIL


def _header_extras(m: dict) -> str:
    text = ""
    if m["tools"]:
        text += "\n\n" + _tools_block(m["tools"])
    if m["response_format"]:
        text += "\n\n" + _RESPONSE_FORMAT_HEAD + m["response_format"]
    return text


def _dsml_calls(calls: list[tuple[str, str, dict]]) -> str:
    invokes = []
    for _, name, args in calls:
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>'
            for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _render(k: int, msgs: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    m = msgs[k]
    role = m["role"]
    if role == "system":
        text = m["content"] + _header_extras(m)
    elif role == "developer":
        text = USER + m["content"] + _header_extras(m)
    elif role == "user":
        text = USER + "\n\n".join(
            body if kind == "text" else f"<tool_result>{body}</tool_result>"
            for kind, _, body in m["blocks"])
    elif role == "latest_reminder":
        text = LATEST_REMINDER + m["content"]
    else:  # assistant
        after_task = k > 0 and msgs[k - 1]["task"] is not None
        keep = thinking and not after_task and (not drop or k > last_user)
        text = ((m["reasoning"] or "") + THINK_END if keep else "") + m["content"]
        if m["calls"]:
            text += _dsml_calls(m["calls"])
        if not m["wo_eos"]:
            text += EOS
    return text


def _transition(k: int, msgs: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    """What follows message k when the next one is an assistant or latest_reminder message, or
    when k is the last one: task tokens, or the assistant header that starts the reply."""
    m = msgs[k]
    if k + 1 < len(msgs) and msgs[k + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    if m["task"] == "action":
        return ASSISTANT + (THINK_START if thinking else THINK_END) + dict(TASK_TOKENS)["action"]
    if m["task"] is not None:
        return dict(TASK_TOKENS)[m["task"]]
    if m["role"] in ("user", "developer"):
        think = thinking and (not drop or k >= last_user)
        return ASSISTANT + (THINK_START if think else THINK_END)
    return ""


def encode_messages(messages: list[dict], *, thinking: bool, tools: list | None = None,
                    reasoning_effort: str | None = None, add_generation_prompt: bool = True,
                    drop_thinking: bool = True) -> str:
    """The prompt string (BOS included; tokenize it with special tokens parsed, none added).

    ``tools`` (OpenAI function format) attach to a leading system message, or to an empty system
    message put first. ``drop_thinking`` removes the reasoning of assistant turns before the last
    user turn in thinking mode; it is switched off whenever tools are defined. With
    ``add_generation_prompt=False`` nothing is appended after the last message.
    """
    if not isinstance(messages, list) or not messages:
        raise DsvError("chat: messages must be a non-empty list")
    if reasoning_effort not in REASONING_EFFORTS:
        raise DsvError(f"chat: reasoning_effort {reasoning_effort!r} is not one of "
                       f"{', '.join(repr(e) for e in REASONING_EFFORTS)}")
    msgs = [_normalise(m, i) for i, m in enumerate(messages)]
    if tools:
        functions = _functions(tools, "tools")
        if msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "task": None, "content": "", "tools": [],
                            "response_format": None})
        if msgs[0]["tools"]:
            raise DsvError("chat: tools given both as an argument and on the system message")
        msgs[0] = dict(msgs[0], tools=functions)
    msgs = _fold_tool_results(msgs)
    _order_tool_results(msgs)
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop:
        msgs = _drop_old_reasoning(msgs)
    last_user = _last_user(msgs)
    prompt = BOS
    if thinking and reasoning_effort == "max":
        prompt += _EFFORT_MAX_PREAMBLE
    for k in range(len(msgs)):
        prompt += _render(k, msgs, thinking, drop, last_user)
        if add_generation_prompt or k + 1 < len(msgs):
            prompt += _transition(k, msgs, thinking, drop, last_user)
    return prompt
