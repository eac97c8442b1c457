"""Per-sequence state: window rings, compressed KV, indexer keys, compressor partial blocks.

Cached vectors are stored in the form the model already rounds them to, so storage is
lossless: the nope dims of KV as e4m3 codes with one power-of-two exponent per 64 dims and
the rope dims as bf16 (`Fp8KVStore`); indexer keys as packed e2m1 with one e8m0 scale per 32
(`Fp4KeyStore`). Exact-math mode keeps float32 (`F32Store`); the initial revision, whose KV is
not FP8-rounded, keeps bf16 (`Bf16Store`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from dsv4.quant.blocks import (fp4_dequantize_blocks, fp4_quantize_blocks,
                               fp8_dequantize_blocks, fp8_quantize_blocks)
from dsv4.quant.formats import bf16_to_f32, f32_to_bf16

from .config import INDEX_FP4_BLOCK, KV_FP8_BLOCK, ModelConfig
from .errors import DsvError
from .numerics import Numerics


class F32Store:
    def __init__(self, rows: int, dim: int):
        self.data = np.zeros((rows, dim), np.float32)

    def write(self, rows: np.ndarray, x: np.ndarray) -> None:
        self.data[rows] = x

    def read(self, rows) -> np.ndarray:
        return self.data[rows]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class Bf16Store(F32Store):
    def __init__(self, rows: int, dim: int):
        self.data = np.zeros((rows, dim), np.uint16)

    def write(self, rows, x):
        self.data[rows] = f32_to_bf16(x)

    def read(self, rows):
        return bf16_to_f32(self.data[rows])


class Fp8KVStore:
    """nope dims: e4m3 codes + int8 exponents per 64; rope dims: bf16. Lossless for q8 output."""

    def __init__(self, rows: int, dim: int, rope_dim: int, block: int = KV_FP8_BLOCK):
        nope = dim - rope_dim
        self.nope, self.block = nope, block
        self.codes = np.zeros((rows, nope), np.uint8)
        self.exps = np.zeros((rows, -(-nope // block)), np.int8)
        self.rope = np.zeros((rows, rope_dim), np.uint16)

    def write(self, rows, x):
        codes, k = fp8_quantize_blocks(x[..., :self.nope], self.block)
        self.codes[rows], self.exps[rows] = codes, k
        self.rope[rows] = f32_to_bf16(x[..., self.nope:])

    def read(self, rows):
        nope = fp8_dequantize_blocks(self.codes[rows], self.exps[rows].astype(np.int32), self.block)
        return np.concatenate([nope, bf16_to_f32(self.rope[rows])], axis=-1)

    @property
    def nbytes(self):
        return self.codes.nbytes + self.exps.nbytes + self.rope.nbytes


class Fp4KeyStore:
    """Indexer keys: packed e2m1 + one exponent per 32 dims. Lossless for q4 output."""

    def __init__(self, rows: int, dim: int, block: int = INDEX_FP4_BLOCK):
        self.block = block
        self.packed = np.zeros((rows, dim // 2), np.uint8)
        self.exps = np.zeros((rows, dim // block), np.int8)

    def write(self, rows, x):
        self.packed[rows], self.exps[rows] = fp4_quantize_blocks(x, self.block)

    def read(self, rows):
        return fp4_dequantize_blocks(self.packed[rows], self.exps[rows].astype(np.int32), self.block)

    @property
    def nbytes(self):
        return self.packed.nbytes + self.exps.nbytes


def kv_store(num: Numerics, rows: int, dim: int, rope_dim: int):
    kind = num.kv_storage
    if kind == "fp8":
        return Fp8KVStore(rows, dim, rope_dim)
    return F32Store(rows, dim) if kind == "f32" else Bf16Store(rows, dim)


def key_store(num: Numerics, rows: int, dim: int):
    return F32Store(rows, dim) if num.exact else Fp4KeyStore(rows, dim)


@dataclass
class CompressorState:
    """Rows of the block being filled (and, with overlap, of the last complete block).

    `kv` holds the projected values u, `score` the gate logits plus the position embedding;
    rows are indexed by position within the block.
    """
    ratio: int
    width: int
    overlap: bool
    kv: np.ndarray = field(init=False)
    score: np.ndarray = field(init=False)
    prev_kv: np.ndarray = field(init=False)
    prev_score: np.ndarray = field(init=False)
    has_prev: bool = False

    def __post_init__(self):
        self.kv = np.zeros((self.ratio, self.width), np.float32)
        self.score = np.full((self.ratio, self.width), -np.inf, np.float32)
        self.prev_kv = np.zeros_like(self.kv)
        self.prev_score = np.full_like(self.score, -np.inf)

    @property
    def nbytes(self) -> int:
        return 4 * self.kv.nbytes


@dataclass
class LayerCache:
    window: int
    ring: object                       # store [w, D]; position p lives in slot p % w
    comp: object | None = None         # store [capacity/m, D]
    comp_state: CompressorState | None = None
    index_keys: object | None = None   # store [capacity/4, Id]
    index_state: CompressorState | None = None
    n_comp: int = 0                    # compressed entries written (attention and indexer)

    @property
    def nbytes(self) -> int:
        parts = [self.ring, self.comp, self.comp_state, self.index_keys, self.index_state]
        return sum(p.nbytes for p in parts if p is not None)


class KVCache:
    """All state of one sequence; `pos` is the number of tokens already processed."""

    def __init__(self, cfg: ModelConfig, num: Numerics, capacity: int, layers: int | None = None):
        if capacity < 1:
            raise DsvError(f"context length must be >= 1, got {capacity}")
        self.cfg, self.num, self.capacity = cfg, num, capacity
        self.pos = 0
        self.last_hidden = None        # [hc, d] residual copies after the last block (MTP input)
        n = cfg.n_layers if layers is None else layers
        self.layers = [self._layer(i) for i in range(n)]

    def _layer(self, i: int) -> LayerCache:
        cfg, num = self.cfg, self.num
        D, R, m = cfg.head_dim, cfg.rope_dim, cfg.ratio(i)
        lc = LayerCache(window=cfg.window, ring=kv_store(num, cfg.window, D, R))
        if m > 0:
            c = 2 if m == 4 else 1
            lc.comp = kv_store(num, self.capacity // m, D, R)
            lc.comp_state = CompressorState(m, c * D, m == 4)
        if m == 4:
            lc.index_keys = key_store(num, self.capacity // 4, cfg.index_head_dim)
            lc.index_state = CompressorState(4, 2 * cfg.index_head_dim, True)
        return lc

    def clone(self) -> "KVCache":
        """An independent copy of the whole state (e.g. to reuse a filled context)."""
        return copy.deepcopy(self)

    def check_room(self, n_new: int) -> None:
        if self.pos + n_new > self.capacity:
            raise DsvError(f"sequence of {self.pos + n_new} tokens exceeds the context length "
                           f"{self.capacity} (raise --ctx)")

    @property
    def nbytes(self) -> int:
        return sum(lc.nbytes for lc in self.layers)
