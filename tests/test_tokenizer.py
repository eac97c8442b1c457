"""Tokenizer wrapper, toy tokenizer training, and the streaming detokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from dsv4.runtime.errors import DsvError
from dsv4.runtime.tokenizer import StreamDecoder, Tokenizer, packaged_tokenizer_dir
from dsv4.runtime.toy_tokenizer import (MIN_VOCAB_SIZE, V4_SPECIAL_TOKENS, build_toy_tokenizer,
                                        train_toy_tokenizer)

REAL_VOCAB = 129280
CHAT_VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chat-encoding"
OFFICIAL_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<think>": 128821,
    "</think>": 128822,
    "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828,
}
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、カタカナとひらがな。한국어 문장도 있습니다.",
    "emoji 😀🎉🚀 family 👨‍👩‍👧‍👦 flag 🇳🇴 skin 👍🏽 keycap 1️⃣ heart ❤️",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zalgo z\u0336\u0317a\u0334l",
    "rare CJK 龘靐齉爨 饕餮 魑魅魍魉 and math 𝔸𝕓𝒸 ∀x∈ℝ",
    "code: def f(x):\n\treturn x**2  # ² ≠ 2\n\n\n  trailing   spaces  ",
    "<｜User｜>Hi<｜Assistant｜><think>let me think</think>Answer.<｜end▁of▁sentence｜>",
]


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no_tokenizer")
    return Tokenizer.load(empty, REAL_VOCAB, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    train_toy_tokenizer(1024, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def toy(toy_dir):
    return Tokenizer.load(toy_dir, 1024, bos_token_id=0, eos_token_id=1)


def stream(tok, ids, window=16):
    sd = StreamDecoder(tok, window=window)
    pieces = [sd.push(i) for i in ids]
    return pieces, sd.flush()


# ---------------------------------------------------------------- official tokenizer

def test_official_fallback_source_and_size(official):
    assert official.source == packaged_tokenizer_dir() / "tokenizer.json"
    assert official.size == REAL_VOCAB
    assert (official.bos_id, official.eos_id) == (0, 1)
    assert official.bos_token == "<｜begin▁of▁sentence｜>"
    assert official.eos_token == "<｜end▁of▁sentence｜>"
    assert official.model_max_length == 1048576


@pytest.mark.parametrize("text,tid", sorted(OFFICIAL_IDS.items(), key=lambda kv: kv[1]))
def test_official_special_ids(official, text, tid):
    assert official.token_id(text) == tid
    assert official.encode(text, add_bos=False) == [tid]
    assert official.decode([tid]) == text


def test_official_specials_inside_text(official):
    ids = official.encode("abc</think>def｜DSML｜x<think>y", add_bos=False)
    assert ids.count(128822) == 1 and ids.count(128825) == 1 and ids.count(128821) == 1
    assert official.decode(ids) == "abc</think>def｜DSML｜x<think>y"


def test_official_prompt_and_bos(official):
    prompt = "<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜></think>"
    ids = official.encode(prompt, add_bos=False)
    assert ids[0] == 0 and ids[-1] == 128822
    assert 128803 in ids and 128804 in ids and 1 not in ids
    with_bos = official.encode("S", add_bos=True)
    assert with_bos[0] == 0 and with_bos[1:] == official.encode("S", add_bos=False)
    assert 1 not in with_bos                       # no automatic EOS
    assert official.token_id("not a special token") is None
    assert official.token_id("the") is None        # ordinary vocab entries are not specials


@pytest.mark.parametrize("text", TEXTS)
def test_official_round_trip(official, text):
    assert official.decode(official.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("case", [1, 2])
def test_official_chat_vectors_round_trip(official, case):
    path = CHAT_VECTORS / f"test_output_{case}.txt"
    if not path.is_file():
        pytest.skip("shared chat-encoding vectors not present")
    text = path.read_text(encoding="utf-8")
    ids = official.encode(text, add_bos=False)
    assert ids[0] == 0
    assert official.decode(ids) == text
    pieces, tail = stream(official, ids)
    assert "".join(pieces) + tail == text


# ---------------------------------------------------------------- loading and errors

def test_load_prefers_folder_tokenizer(toy, toy_dir):
    assert toy.source == toy_dir / "tokenizer.json"
    assert toy.size <= 1024


def test_ids_resolved_from_tokenizer_config(toy_dir):
    tok = Tokenizer.load(toy_dir, 1024)
    assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_missing_folder(tmp_path):
    with pytest.raises(DsvError, match="model folder not found"):
        Tokenizer.load(tmp_path / "nope", 1024, 0, 1)


def test_fallback_too_big_names_folder(tmp_path):
    with pytest.raises(DsvError, match=str(tmp_path)) as err:
        Tokenizer.load(tmp_path, 1024, 0, 1)
    assert "129280" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_bigger_than_vocab(toy_dir, toy):
    with pytest.raises(DsvError, match="vocab_size is 1000"):
        Tokenizer.load(toy_dir, 1000, 0, 1)
    Tokenizer.load(toy_dir, toy.size, 0, 1)          # exactly fitting is fine


def test_bad_bos_eos_ids(toy_dir, toy):
    with pytest.raises(DsvError, match="bos_token_id=5000"):
        Tokenizer.load(toy_dir, 8192, 5000, 1)
    with pytest.raises(DsvError, match="eos_token_id=-1"):
        Tokenizer.load(toy_dir, 1024, 0, -1)
    with pytest.raises(DsvError, match="eos_token_id=0 but"):   # config names id 1
        Tokenizer.load(toy_dir, 1024, 0, 0)


def test_missing_ids_and_config(tmp_path, toy_dir):
    (tmp_path / "tokenizer.json").write_bytes((toy_dir / "tokenizer.json").read_bytes())
    with pytest.raises(DsvError, match="no bos_token_id"):
        Tokenizer.load(tmp_path, 1024)
    assert Tokenizer.load(tmp_path, 1024, 0, 1).model_max_length is None


def test_corrupt_files(tmp_path, toy_dir):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DsvError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path, 1024, 0, 1)
    (tmp_path / "tokenizer.json").write_bytes((toy_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DsvError, match="JSON object"):
        Tokenizer.load(tmp_path, 1024, 0, 1)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}', encoding="utf-8")
    with pytest.raises(DsvError, match="bos_token '<nope>' is not a token"):
        Tokenizer.load(tmp_path, 1024, 0, 1)


# ---------------------------------------------------------------- toy tokenizer

def test_toy_training_is_deterministic(tmp_path, toy_dir):
    again = train_toy_tokenizer(1024, tmp_path / "tokenizer.json")
    assert again.read_bytes() == (toy_dir / "tokenizer.json").read_bytes()
    assert build_toy_tokenizer(300).to_str() == build_toy_tokenizer(300).to_str()
    assert build_toy_tokenizer(300).to_str() != build_toy_tokenizer(400).to_str()


def test_toy_special_tokens_match_official(toy_dir, toy):
    data = json.loads((toy_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t for t in data["added_tokens"]}
    official = json.loads((packaged_tokenizer_dir() / "tokenizer.json").read_text("utf-8"))
    official_added = {t["content"]: t for t in official["added_tokens"]}
    assert [t["id"] for t in data["added_tokens"]] == list(range(len(V4_SPECIAL_TOKENS)))
    for tid, (text, _) in enumerate(V4_SPECIAL_TOKENS):
        assert toy.token_id(text) == tid
        assert added[text]["special"] == official_added[text]["special"], text
        assert added[text]["normalized"] == official_added[text]["normalized"], text
        assert toy.encode(text, add_bos=False) == [tid]
    assert (toy.bos_id, toy.eos_id) == (0, 1)


def test_toy_specials_inside_text(toy):
    think, end_think, dsml = (toy.token_id(s) for s in ("<think>", "</think>", "｜DSML｜"))
    ids = toy.encode("abc</think>def", add_bos=False)
    assert end_think in ids and toy.decode(ids) == "abc</think>def"
    ids = toy.encode("x<think>y｜DSML｜invoke", add_bos=True)
    assert ids[0] == 0 and think in ids and dsml in ids
    assert toy.decode(ids) == "<｜begin▁of▁sentence｜>x<think>y｜DSML｜invoke"


def test_toy_config_file(toy_dir):
    cfg = json.loads((toy_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert cfg["eos_token"] == "<｜end▁of▁sentence｜>"
    assert cfg["add_bos_token"] is False and cfg["model_max_length"] == 1048576


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, 1024])
def test_toy_size_fits(vocab_size):
    tk = build_toy_tokenizer(vocab_size)
    assert tk.get_vocab_size(with_added_tokens=True) <= vocab_size


def test_toy_too_small_or_bad_path(tmp_path):
    with pytest.raises(DsvError, match=f">= {MIN_VOCAB_SIZE}"):
        build_toy_tokenizer(MIN_VOCAB_SIZE - 1)
    with pytest.raises(DsvError, match="folder"):
        train_toy_tokenizer(1024, tmp_path)


def _random_unicode(rng, n):
    cps = rng.integers(0, 0x110000, size=n)
    cps = np.where((cps >= 0xD800) & (cps < 0xE000), cps - 0x800, cps)   # no surrogates
    return "".join(map(chr, cps.tolist()))


def test_toy_round_trips_any_string(toy):
    rng = np.random.default_rng(7)
    for text in TEXTS + ["\x00\x01\x7f\x80\xff", "\ufffd", " ", "\n\r\t", ""]:
        assert toy.decode(toy.encode(text, add_bos=False)) == text
    for _ in range(200):
        text = _random_unicode(rng, int(rng.integers(1, 40)))
        assert toy.decode(toy.encode(text, add_bos=False)) == text


# ---------------------------------------------------------------- streaming decode

@pytest.mark.parametrize("which", ["official", "toy"])
@pytest.mark.parametrize("window", [1, 16])
def test_stream_real_text_every_boundary(request, which, window):
    tok = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        pieces, tail = stream(tok, ids, window)
        assert "".join(pieces) + tail == text
        assert all("\ufffd" not in p for p in pieces) and tail == ""


@pytest.mark.parametrize("which", ["official", "toy"])
@pytest.mark.parametrize("window", [1, 3, 16])
def test_stream_random_ids(request, which, window):
    tok = request.getfixturevalue(which)
    rng = np.random.default_rng(1234)
    # Single-byte tokens (ids of the 256 byte-level characters) split characters the most.
    byte_ids = [tok._tk.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    byte_ids = np.array([i for i in byte_ids if i is not None])
    for trial in range(150):
        n = int(rng.integers(1, 60))
        ids = rng.integers(0, tok.size, size=n)
        if trial % 2:
            mask = rng.random(n) < 0.7
            ids[mask] = rng.choice(byte_ids, size=int(mask.sum()))
        ids = ids.tolist()
        pieces, tail = stream(tok, ids, window)
        assert "".join(pieces) + tail == tok.decode(ids)


@pytest.mark.parametrize("which", ["official", "toy"])
@pytest.mark.parametrize("window", [1, 2])
def test_stream_random_fragment_tokens(request, which, window):
    """Tokens that are pieces of characters (lead bytes at the end, continuation bytes at the
    start) chained at random: the hardest case for the window cut."""
    tok = request.getfixturevalue(which)
    fragments = np.array([i for i in range(tok.size) if "\ufffd" in tok.decode([i])])
    assert fragments.size > 100
    rng = np.random.default_rng(99)
    for _ in range(150):
        ids = rng.choice(fragments, size=int(rng.integers(2, 40))).tolist()
        pieces, tail = stream(tok, ids, window)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_stream_holds_split_character(toy):
    ids = _byte_token_ids(toy, "😀")                    # 4 bytes, 4 single-byte tokens
    sd = StreamDecoder(toy)
    assert [sd.push(i) for i in ids] == ["", "", "", "😀"]
    assert sd.push(ids[0]) == "" and sd.flush() == "\ufffd"   # unfinished at the end
    assert sd.flush() == ""


def test_stream_window_stays_small_on_invalid_bytes(toy):
    lead = _byte_token_ids(toy, "中")[0]                      # a lone 3-byte lead byte
    sd = StreamDecoder(toy, window=4)
    out = "".join(sd.push(lead) for _ in range(200))
    assert len(sd._ids) <= 5                                  # cut at character boundaries
    assert out + sd.flush() == "\ufffd" * 200 == toy.decode([lead] * 200)


def test_stream_rejects_non_byte_level():
    tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tok = Tokenizer(tk, source=Path("word.json"), vocab_size=2, bos_token_id=0, eos_token_id=1)
    with pytest.raises(DsvError, match="byte-level"):
        StreamDecoder(tok)



def _byte_token_ids(tok, text):
    """Ids of the single-byte tokens spelling ``text``'s UTF-8 bytes, one per byte."""
    mapped = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    chars = "".join(piece for piece, _ in mapped)
    assert len(chars) == len(text.encode("utf-8"))
    return [tok._tk.token_to_id(c) for c in chars]
