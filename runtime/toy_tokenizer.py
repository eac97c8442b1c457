"""A small byte-level BPE tokenizer for test models whose vocab is too small for the real one.

It keeps what the runtime relies on from the official V4 tokenizer: byte-level BPE (any
string round-trips exactly), and the V4 special tokens as added tokens, with the official
strings and ``special`` / ``normalized`` flags, at the start of the id range (BOS 0, EOS 1).
Training is deterministic for a given vocab_size, so a test checkpoint can be rebuilt
byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv4.runtime.errors import DsvError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"

# (string, special) in id order; flags as in the official tokenizer.json. Official added
# tokens marked special are also not normalized; the others are.
V4_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (BOS_TOKEN, True),
    (EOS_TOKEN, True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<think>", False),
    ("</think>", False),
    ("｜DSML｜", False),
    ("<｜latest_reminder｜>", False),
    ("<｜action｜>", False),
    ("<｜query｜>", False),
    ("<｜authority｜>", False),
    ("<｜domain｜>", False),
    ("<｜title｜>", False),
    ("<｜read_url｜>", False),
    ("<｜extracted_url｜>", False),
)

BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = len(V4_SPECIAL_TOKENS) + BYTE_ALPHABET
DEFAULT_MODEL_MAX_LENGTH = 1048576


def toy_corpus_path() -> Path:
    return Path(__file__).resolve().parent / "data" / "toy_corpus.txt"


def build_toy_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """Train in memory; the result has at most ``vocab_size`` ids."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise DsvError(f"toy tokenizer vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DsvError(f"toy tokenizer vocab_size must be >= {MIN_VOCAB_SIZE} "
                       f"({len(V4_SPECIAL_TOKENS)} special tokens + 256 bytes), got {vocab_size}")
    corpus = toy_corpus_path()
    try:
        text = corpus.read_text(encoding="utf-8")
    except OSError as exc:
        raise DsvError(f"{corpus}: cannot read the toy tokenizer corpus ({exc.strerror})") from None

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[s for s, _ in V4_SPECIAL_TOKENS],   # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([text], trainer=trainer)

    # The trainer registers its special tokens with special=True; set the official flags.
    data = json.loads(tk.to_str())
    flags = dict(V4_SPECIAL_TOKENS)
    for entry in data["added_tokens"]:
        entry["special"] = flags[entry["content"]]
        entry["normalized"] = not flags[entry["content"]]
    return tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def toy_tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """tokenizer_config.json matching the toy tokenizer (same keys as the official one)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DsvError(f"{path}: cannot write ({exc.strerror})") from None


def train_toy_tokenizer(vocab_size: int, path: str | Path,
                        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Train the toy tokenizer, write it to ``path`` (a tokenizer.json) and a matching
    tokenizer_config.json beside it; returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise DsvError(f"{path}: expected a file path for tokenizer.json, got a folder")
    tk = build_toy_tokenizer(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(toy_tokenizer_config(model_max_length), ensure_ascii=False, indent=2)
    _write_atomic(path, tk.to_str(pretty=True))
    _write_atomic(path.parent / "tokenizer_config.json", config + "\n")
    return path
