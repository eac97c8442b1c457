"""The lightning indexer of CSA layers (m = 4): which compressed entries each query reads.

Queries come from the query latent qr: project, RoPE, Hadamard rotation, FP4 round trip.
Keys are the indexer's own compressed entries (Hadamard + FP4). A query at position p sees
entries t < (p+1) // 4 and keeps the `index_topk` best by sum_h w_h relu(q_h . k_t).
"""
from __future__ import annotations

import numpy as np

from ..config import INDEX_FP4_BLOCK, ModelConfig
from ..kv_cache import LayerCache
from ..nn import F32, topk_desc
from ..params import IndexerW
from ..rope import Rope
from . import compressor


def index_queries(cfg: ModelConfig, xqi: np.ndarray, positions: np.ndarray, rope: Rope,
                  be) -> np.ndarray:
    """qr wq_b^T [S, Ih*Id] (qr: the query latent) -> indexer queries [S, Ih, Id] (rotated,
    FP4-rounded)."""
    qi = be.bf16(xqi).reshape(xqi.shape[0], cfg.index_n_heads, cfg.index_head_dim)
    qi = be.hadamard(be.rope(qi, positions, rope))
    return be.fp4(qi, INDEX_FP4_BLOCK)


def head_weights(cfg: ModelConfig, xw: np.ndarray, be) -> np.ndarray:
    """x weights_proj^T [S, Ih] -> per-head weights [S, Ih], times 1/(sqrt(Id) sqrt(Ih))."""
    c = F32(cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
    return be.bf16(be.bf16(xw) * c)


def update_keys(cfg: ModelConfig, w: IndexerW, lc: LayerCache, u: np.ndarray, g: np.ndarray,
                p0: int, rope: Rope, be) -> None:
    """Advance the indexer's compressor by the chunk (projections u, g) and store keys."""
    first, raw = compressor.advance(w.compressor, lc.index_state, u, g, p0)
    if raw.shape[0]:
        k = compressor.finish_entries(w.compressor, raw, first, rope, cfg.norm_eps, be)
        k = be.fp4(be.hadamard(k), INDEX_FP4_BLOCK)
        be.write_kv(lc.index_keys, slice(first, first + k.shape[0]), k)


def select(scores: np.ndarray, positions: np.ndarray, ratio: int, topk: int) -> np.ndarray:
    """scores [S, T] -> selected entry ids [S, min(topk, T)], -1 where fewer are visible.

    Entry t is visible to the query at position p iff t < (p + 1) // ratio; ties prefer
    the lower entry id.
    """
    S, T = scores.shape
    k = min(topk, T)
    visible = np.arange(T)[None, :] < ((positions + 1) // ratio)[:, None]     # [S, T]
    masked = np.where(visible, scores, -np.inf)
    idx = topk_desc(masked, k)                                                  # [S, k]
    n_vis = visible.sum(axis=1)
    rank = np.arange(k)[None, :]
    return np.where(rank < n_vis[:, None], idx, -1)


def indexer_select(cfg: ModelConfig, w: IndexerW, lc: LayerCache, xqi: np.ndarray,
                   xw: np.ndarray, u: np.ndarray, g: np.ndarray, p0: int, rope: Rope,
                   be) -> np.ndarray:
    """Advance the indexer keys by the chunk, then pick each query's compressed entries.
    xqi: the query latent times wq_b; xw, u, g: x times weights_proj, compressor wkv and
    wgate."""
    S = xqi.shape[0]
    positions = np.arange(p0, p0 + S)
    qi = index_queries(cfg, xqi, positions, rope, be)                          # [S, Ih, Id]
    update_keys(cfg, w, lc, u, g, p0, rope, be)
    T = (p0 + S) // 4
    if T == 0:
        return np.zeros((S, 0), np.int64)
    wt = head_weights(cfg, xw, be)                                              # [S, Ih]
    scores = be.index_scores(qi, wt, lc.index_keys, T)                          # [S, T]
    return be.select_topk(scores, positions, 4, cfg.index_topk)
