"""The DeepSeek-V4 model: embedding, blocks, final hyper-connection mix, norm and head.

    model = Model.load("path/to/checkpoint")            # mmap, validate, no conversion
    cache = model.new_cache(capacity=4096)
    logits = model.forward(token_ids, cache)             # [S, vocab] float32, every position
    logits = model.forward([next_id], cache)             # decode continues the sequence

A chunk may start at any position and have any length: prefill, chunked prefill and
decode all go through the same code.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .backend import RefBackend
from .config import ModelConfig
from .errors import DsvError
from .kv_cache import KVCache
from .linear import as_f32
from .numerics import Numerics
from .params import ModelWeights, load_weights
from .rope import Rope
from .weights import Checkpoint


def make_backend(name: str, num: Numerics):
    if name == "ref":
        return RefBackend(num)
    if name == "fast":
        from .kernels.backend import FastBackend   # noqa: PLC0415 (numba import is slow)
        return FastBackend(num)
    raise DsvError(f"unknown backend '{name}' (choose 'ref' or 'fast')")


def per_token_weights(cfg: ModelConfig, names: list[str]) -> list[str]:
    """The tensors every decoded token reads, in the order the forward reads them: all but
    the embedding table (a row per token), the routed experts (chosen per token) and MTP."""
    per_layer: dict[str, list[str]] = {}
    rest = []
    for n in names:
        if n.startswith("layers."):
            prefix = n[:n.index(".", len("layers.")) + 1]                 # "layers.<i>."
            if not n.startswith(prefix + "ffn.experts."):
                per_layer.setdefault(prefix, []).append(n)
        elif not n.startswith("mtp.") and n != "embed.weight":
            rest.append(n)                                                # head, norm, hc_head
    return [n for layer in range(cfg.n_layers)
            for n in per_layer.get(cfg.layer_prefix(layer), [])] + rest


class Model:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, num: Numerics, backend,
                 ckpt: Checkpoint | None = None):
        self.cfg, self.w, self.num, self.be = cfg, weights, num, backend
        self.ckpt = ckpt
        self.ropes = tuple(Rope.for_layer(cfg, layer) for layer in range(cfg.n_total_layers))

    @classmethod
    def load(cls, model_dir: str | Path, numerics: Numerics | None = None,
             backend: str = "ref", with_mtp: bool = True, warm: bool = False, in_memory: bool = False,
             progress: Callable[[int, int], None] | None = None) -> "Model":
        """Map and validate a checkpoint folder. ``warm``: page in the weights every token
        reads on a background thread, overlapping the backend's start-up (shortens the first
        forward of a fresh process). ``in_memory``: read the shards into this process's
        memory first instead of mapping them (Checkpoint.read_in; progress(done, total))."""
        num = numerics or Numerics()
        cfg = ModelConfig.load(model_dir)
        ckpt = Checkpoint(model_dir, in_memory=in_memory)
        ckpt.read_in(progress)
        weights = load_weights(ckpt, cfg, with_mtp=with_mtp)
        if warm:
            ckpt.prefault_background(per_token_weights(cfg, ckpt.names()))
        be = make_backend(backend, num)
        model = cls(cfg, weights, num, be, ckpt)
        if hasattr(be, "prepare"):          # fast kernels build their address tables once
            be.prepare(model)
        return model

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.cfg, self.num, capacity)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [S] -> hc copies of the embedding [S, hc, d] (float32 of bf16 values)."""
        e = as_f32(self.w.embed[ids])                                          # [S, d]
        return np.repeat(e[:, None, :], self.cfg.hc_mult, axis=1)              # [S, hc, d]

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.pos ... and return float32 logits [S, vocab]
        (or [1, vocab] for the last position)."""
        cfg, be = self.cfg, self.be
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise DsvError("forward() needs at least one token")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise DsvError(f"token id outside the vocabulary [0, {cfg.vocab_size})")
        cache.check_room(ids.size)
        p0 = cache.pos

        X = self.embed(ids)                                                    # [S, hc, d]
        for blk, lc, rope in zip(self.w.blocks, cache.layers, self.ropes):
            X = be.block(cfg, blk, X, ids, p0, lc, rope)                       # [S, hc, d]
        cache.pos = p0 + ids.size
        cache.last_hidden = X[-1]                                              # [hc, d] (MTP input)

        if last_only:
            X = X[-1:]
        y = be.hc_head(X, self.w.hc_head, cfg.hc_eps, cfg.norm_eps)            # [S, d]
        y = be.rmsnorm(y, self.w.norm, cfg.norm_eps)
        return be.logits(y, self.w.head)                                       # [S, V]
