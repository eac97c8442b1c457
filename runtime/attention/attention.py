"""Attention of one layer for a chunk of S tokens at positions p0 .. p0+S-1.

MQA with one shared 512-d KV vector per token used as key and value; keys of a query at p:
the window tokens max(0, p-w+1) .. p, plus compressed entries (m = 128: all visible ones,
m = 4: the indexer's choice). The sink adds exp(sink_h) to each head's denominator. The
output's rope dims are rotated back by the query position, then the grouped low-rank
projection wo_a (bf16, no activation quantization) and wo_b (FP8).

`attention` does the matmuls and hands the part between them to the backend's `attend`,
whose reference is `attend` below (the fast backend runs a decode step compiled in one
piece, kernels/attn_step.py).
"""
from __future__ import annotations

import numpy as np

from ..config import KV_FP8_BLOCK, ModelConfig
from ..kv_cache import LayerCache
from ..params import AttnW
from ..rope import Rope
from . import compressor
from .indexer import indexer_select


def projections(w: AttnW) -> list:
    """Every weight applied to the layer input x, in the order `attention` unpacks them."""
    ws = [w.wq_a, w.wkv]
    if w.compressor is not None:
        ws += [w.compressor.wkv, w.compressor.wgate]
    if w.indexer is not None:
        ws += [w.indexer.weights_proj, w.indexer.compressor.wkv, w.indexer.compressor.wgate]
    return ws


def query_weights(w: AttnW) -> list:
    """The weights applied to the query latent qr: wq_b, and the indexer's wq_b."""
    return [w.wq_b] + ([w.indexer.wq_b] if w.indexer is not None else [])


def query(cfg: ModelConfig, xq: np.ndarray, pos: np.ndarray, rope: Rope, be) -> np.ndarray:
    """qr wq_b^T [S, H*D] -> q [S, H, D] normalised per head and rotated."""
    q = be.bf16(xq).reshape(xq.shape[0], cfg.n_heads, cfg.head_dim)                # [S, H, D]
    q = be.head_norm(q, cfg.norm_eps)
    return be.rope(q, pos, rope)


def window_kv(cfg: ModelConfig, w: AttnW, xkv: np.ndarray, pos: np.ndarray, rope: Rope,
              be) -> np.ndarray:
    """x wkv^T [S, D] -> kv [S, D]: normalised, rope dims rotated, nope dims FP8-rounded."""
    kv = be.rmsnorm(xkv, w.kv_norm, cfg.norm_eps, round_input=True)                  # [S, D]
    kv = be.rope(kv[:, None], pos, rope)[:, 0]
    kv[:, :cfg.nope_dim] = be.kv_fp8(kv[:, :cfg.nope_dim], KV_FP8_BLOCK)
    return kv


def update_compressed(cfg: ModelConfig, w: AttnW, lc: LayerCache, u: np.ndarray, g: np.ndarray,
                      p0: int, rope: Rope, be) -> None:
    """Advance the attention compressor by the chunk (its projections u, g of x) and
    store completed entries."""
    first, raw = compressor.advance(w.compressor, lc.comp_state, u, g, p0)
    if raw.shape[0]:
        kv = compressor.finish_entries(w.compressor, raw, first, rope, cfg.norm_eps, be)
        kv[:, :cfg.nope_dim] = be.kv_fp8(kv[:, :cfg.nope_dim], KV_FP8_BLOCK)
        be.write_kv(lc.comp, slice(first, first + kv.shape[0]), kv)
        lc.n_comp = first + kv.shape[0]


def window_index(pos: np.ndarray, base: int, window: int) -> np.ndarray:
    """Rows (into keys starting at position `base`) of each query's window, -1 padded."""
    offs = np.arange(window)[None, :] - (window - 1)                  # [1, w]: -w+1 .. 0
    kpos = pos[:, None] + offs                                        # [S, w]
    return np.where(kpos >= max(base, 0), kpos - base, -1)


def attention(cfg: ModelConfig, layer: int, w: AttnW, x: np.ndarray, p0: int, lc: LayerCache,
              rope: Rope, be) -> np.ndarray:
    """x [S, d] (bf16 values) -> attention output [S, d]; advances the layer cache."""
    S = x.shape[0]
    proj = be.project(x, projections(w))   # all matmuls of x, batched per format
    qr = be.rmsnorm(proj[0], w.q_norm, cfg.norm_eps, round_input=True)            # [S, Lq]
    qs = be.project(qr, query_weights(w))                    # [S, H*D] (+ indexer [S, Ih*Id])
    o = be.attend(cfg, layer, w, lc, p0, qs, proj[1:], rope)                      # [S, H, D]
    og = o.reshape(S, cfg.o_groups, -1)                               # [S, G, H*D/G]
    z = be.bf16(be.grouped_linear(og, w.wo_a).reshape(S, -1))         # [S, G*Lo]
    return be.bf16(be.linear(z, w.wo_b))                             # [S, d]


def attend(cfg: ModelConfig, layer: int, w: AttnW, lc: LayerCache, p0: int, qs: list,
           proj: list, rope: Rope, be) -> np.ndarray:
    """The attention between the matmuls: qs = [qr wq_b^T (, qr indexer.wq_b^T)], proj = the
    products of x after wq_a (wkv, compressor, indexer; see `projections`) -> o [S, H, D],
    bf16 values with the rope dims rotated back; advances the layer cache."""
    S, m, win = qs[0].shape[0], cfg.ratio(layer), cfg.window
    pos = np.arange(p0, p0 + S)
    proj = iter(proj)
    q = query(cfg, qs[0], pos, rope, be)                               # [S, H, D]
    kv = window_kv(cfg, w, next(proj), pos, rope, be)                  # [S, D]
    comp_ug = (next(proj), next(proj)) if m > 0 else None              # [S, c*D] each

    # keys = [earlier window tokens from the ring | this chunk | compressed entries used]
    n_prev = min(p0, win - 1)
    ring_rows = np.arange(p0 - n_prev, p0) % win
    keys = [be.read_kv(lc.ring, ring_rows), kv]
    idx = window_index(pos, p0 - n_prev, win)                          # [S, w]
    if m > 0:
        sel = None
        if w.indexer is not None:
            wp, iu, ig = next(proj), next(proj), next(proj)
            sel = indexer_select(cfg, w.indexer, lc, qs[1], wp, iu, ig, p0, rope, be)  # [S, k]
        update_compressed(cfg, w, lc, *comp_ug, p0, rope, be)
        if sel is None:                                                # HCA: all visible
            t = np.arange((p0 + S) // m)[None, :]
            sel = np.where(t < ((pos + 1) // m)[:, None], t, -1)
        used, local = np.unique(sel, return_inverse=True)              # entry ids, -1 first
        local = local.reshape(sel.shape) - (1 if used.size and used[0] < 0 else 0)
        used = used[used >= 0]
        idx = np.concatenate([idx, np.where(sel >= 0, local + n_prev + S, -1)], axis=1)
        keys.append(be.read_kv(lc.comp, used))
    tail = pos[-min(S, win):]
    be.write_kv(lc.ring, tail % win, kv[-tail.size:])

    o = be.sparse_attn(q, np.concatenate(keys), idx, w.sink, cfg.head_dim ** -0.5)
    return be.rope(be.bf16(o), pos, rope, inverse=True)                # [S, H, D]
