"""KV-cache arithmetic: bytes per token and for a context, per storage policy.

Matches what `KVCache` allocates (tested), so `dsv4 info` can plan a 1M-token context
without allocating it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import INDEX_FP4_BLOCK, KV_FP8_BLOCK, ModelConfig


def entry_bytes(dim: int, rope_dim: int, storage: str) -> int:
    """Bytes of one cached KV vector of `dim` dims."""
    if storage == "fp8":
        nope = dim - rope_dim
        return nope + -(-nope // KV_FP8_BLOCK) + 2 * rope_dim
    return dim * (4 if storage == "f32" else 2)


def key_bytes(dim: int, storage: str) -> int:
    """Bytes of one indexer key (FP4 + scales, or float32 in exact mode)."""
    return dim * 4 if storage == "f32" else dim // 2 + dim // INDEX_FP4_BLOCK


@dataclass(frozen=True)
class KVPlan:
    storage: str
    entry: int                       # bytes of one compressed KV entry
    key: int                         # bytes of one indexer key
    ratios: tuple[int, ...]          # compression ratio of each main layer
    fixed: int                       # rings and compressor states, bytes

    @property
    def per_token(self) -> float:
        """Growing part, bytes per token over all main layers."""
        return sum(self.entry / m + (self.key / 4 if m == 4 else 0) for m in self.ratios if m)

    def total(self, tokens: int) -> int:
        """Bytes for a context of `tokens` (what KVCache(capacity=tokens) allocates)."""
        grow = sum((tokens // m) * self.entry + ((tokens // 4) * self.key if m == 4 else 0)
                   for m in self.ratios if m)
        return self.fixed + grow


def plan(cfg: ModelConfig, storage: str = "fp8") -> KVPlan:
    D = cfg.head_dim
    e = entry_bytes(D, cfg.rope_dim, storage)
    k = key_bytes(cfg.index_head_dim, storage)
    fixed = 0
    ratios = tuple(cfg.ratio(layer) for layer in range(cfg.n_layers))
    for m in ratios:
        fixed += cfg.window * e
        if m > 0:
            c = 2 if m == 4 else 1
            fixed += 4 * m * c * D * 4              # kv, score, previous-block kv and score
        if m == 4:
            fixed += 4 * 4 * 2 * cfg.index_head_dim * 4
    return KVPlan(storage, e, k, ratios, fixed)


def reference_bf16_per_token(cfg: ModelConfig) -> float:
    """The official code's allocation: everything bf16 (spec §7.2 'reference storage')."""
    total = 0.0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        if m > 0:
            total += 2 * cfg.head_dim / m
        if m == 4:
            total += 2 * cfg.index_head_dim / 4
    return total
