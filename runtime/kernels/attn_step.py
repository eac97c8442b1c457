"""Decode attention of one layer for one token in ONE compiled call (Numba).

`attend_one` is attention.attend for S = 1 in the model's default numerics (bf16 rounding
on, cached KV nope dims rounded to e4m3, KV in an Fp8KVStore, indexer keys in an
Fp4KeyStore): everything between the query matmuls and wo_a, without returning to Python.
Each piece is the fused kernel the fast backend calls one by one on that path (glue.py,
actq.py, attn_kv.py, attn_index.py, attn_topk.py, attn_decode.py), called here in the same
order on the same values, so the results are bit-identical to it; the compressor's pooling
is written out below (compressor.pool: float64 softmax, rows added in order).

Per token it replaces about 25 Python-level calls per compressed layer (each with its
checks, allocations and, for some, a parallel region) by one; the parallel regions left
are those with real work: KV row decoding, the indexer's scores and the attention itself.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .actq import quant_row
from . import ir, sources
from .attn_decode import attend_keys_into
from .attn_index import index_scores_into
from .attn_kv import read_kv_fp8_into, write_kv_fp4_into, write_kv_fp8_into
from .attn_topk import topk_rows_into
from .glue import (
    bf16,
    hadamard_rows,
    head_norm_vec,
    q4_rows,
    rmsnorm_rows,
    rope_angles,
    rope_rows,
    rope_vec,
)

F32 = np.float32
KV_BLOCK = 64              # config.KV_FP8_BLOCK (e4m3 rounding and storage of KV nope dims)
INDEX_BLOCK = 32           # config.INDEX_FP4_BLOCK (indexer queries and keys)
_OPTS = {"cache": True, "boundscheck": False, "error_model": "numpy", "nogil": True}


@njit(**_OPTS)
def _cos_sin(p, freqs, inverse):
    """The rotation of position p as glue.rope_rows computes it."""
    cos, sin = np.empty(freqs.shape[0], F32), np.empty(freqs.shape[0], F32)
    rope_angles(p, freqs, inverse, cos, sin)
    return cos, sin


@njit(**_OPTS, parallel=True)
def _query_heads(xq, eps, cos, sin, q):
    """q [1, H, D] = rope(head_norm(bf16(xq))) (glue's bf16, head_norm_rows, rope_rows in
    sequence), heads in parallel."""
    H, D = q.shape[1], q.shape[2]
    for h in prange(H):
        v, src = q[0, h], xq[h * D:(h + 1) * D]     # (indexing xq[h * D + j] kept the loop scalar)
        for j in range(D):
            v[j] = bf16(src[j])
        head_norm_vec(v, eps, True)
        rope_vec(v, cos, sin, True)


@njit(**_OPTS, parallel=True)
def _index_heads(xqi, cos, sin, qi):
    """Indexer queries qi [1, Ih, Id] = fp4(hadamard(rope(bf16(xqi)))), heads in parallel."""
    Ih, Id = qi.shape[1], qi.shape[2]
    q2 = qi.reshape(Ih, Id)
    for h in prange(Ih):
        v, src = q2[h], xqi[h * Id:(h + 1) * Id]
        for j in range(Id):
            v[j] = bf16(src[j])
        rope_vec(v, cos, sin, True)
        hadamard_rows(q2[h:h + 1], True)
        q4_rows(q2[h:h + 1], INDEX_BLOCK)


@njit(**_OPTS)
def _advance(st_kv, st_score, prev_kv, prev_score, ape, overlap, u, g, p, out):
    """compressor.advance for one token at position p: store its row (u, g + ape) in the
    block; when that completes the block, pool the entry into out [Dc] and start the next
    block -> True if an entry was completed."""
    m, C = st_kv.shape
    r0 = p % m
    for c in range(C):
        st_kv[r0, c] = u[c]
        st_score[r0, c] = g[c] + ape[r0, c]
    if r0 + 1 < m:
        return False
    dc = out.shape[0]
    if overlap:         # rows: first halves of the previous block, then second halves of this
        _pool(prev_kv, prev_score, 0, st_kv, st_score, dc, out)
        prev_kv[:, :] = st_kv
        prev_score[:, :] = st_score
    else:
        _pool(st_kv[:0], st_score[:0], 0, st_kv, st_score, 0, out)
    st_kv[:, :] = 0.0
    st_score[:, :] = -np.inf
    return True


@njit(**_OPTS)
def _pool(a_kv, a_sc, a_off, b_kv, b_sc, b_off, out):
    """compressor.pool over the rows a[:, a_off:a_off+Dc] then b[:, b_off:b_off+Dc]: per
    channel a float64 softmax of the scores, weights times values summed row by row."""
    for c in range(out.shape[0]):
        mx = -np.inf
        for r in range(a_sc.shape[0]):
            mx = max(mx, np.float64(a_sc[r, a_off + c]))
        for r in range(b_sc.shape[0]):
            mx = max(mx, np.float64(b_sc[r, b_off + c]))
        num = 0.0
        den = 0.0
        for r in range(a_sc.shape[0]):
            e = np.exp(np.float64(a_sc[r, a_off + c]) - mx)
            num += e * np.float64(a_kv[r, a_off + c])
            den += e
        for r in range(b_sc.shape[0]):
            e = np.exp(np.float64(b_sc[r, b_off + c]) - mx)
            num += e * np.float64(b_kv[r, b_off + c])
            den += e
        out[c] = F32(num / den)


@njit(**_OPTS)
def _finish_entry(raw, norm, eps, pos, freqs, out):
    """compressor.finish_entries for one entry: out [1, Dc] = rope(rmsnorm(raw)) at pos."""
    rmsnorm_rows(raw.reshape(1, -1), norm, eps, True, True, out)
    rope_rows(out.reshape(1, 1, -1), np.full(1, pos, np.int64), freqs, False, True)


@functools.cache
def attend_one_for(variant: str):
    """attend_one compiled for kernel variant `variant` ('avx512', 'avx2' or 'numba', whose
    products the attention and the indexer use), cached on disk; from compiled code:
    attend_one_into (see attn_decode.attend_keys on why)."""
    ISA, DIGEST = variant, sources.digest()                  # compile-time constants

    def attend_one(p, window, ratio, eps, scale, nthreads, freqs, sink, kv_norm,
                   xq, xkv, comp, comp_w, comp_st, xqi, xw, index, index_w, index_st, wscale, topk,
                   ring, keys, q, out):
        """attention.attend for one token at position p (see the module docstring); the
        attention itself on nthreads threads.

        xq [H*D] = qr wq_b^T; xkv [D] = x wkv^T; comp = (u, g) [c*D] the compressor's products
        of x and comp_w = (norm [D], ape [m, c*D]), comp_st = (kv, score, prev_kv, prev_score)
        its state, all empty when ratio == 0; for the indexer (ratio 4; else empty): xqi [Ih*Id]
        = qr wq_b^T, xw [Ih] = x weights_proj^T, index = (u, g, packed keys, key exps),
        index_w = (norm, ape), index_st its state, wscale the head-weight factor, topk.
        ring = (codes, exps, rope) of the window ring, then of the compressed KV store; keys
        f32 [>= window + entries used, D], q f32 [1, H, D] (scratch) and out f32 [1, H, D] (the
        result), 64-byte aligned for the attention kernel's loads.
        -> number of compressed entries written so far (LayerCache.n_comp)."""
        assert DIGEST != ""
        D = out.shape[2]
        nope = ring[0].shape[1]
        cos, sin = _cos_sin(p, freqs, False)
        _query_heads(xq, eps, cos, sin, q)                                   # [1, H, D]
        pos = np.full(1, p, np.int64)

        # this token's KV row: norm, rope, e4m3 nope dims                      [D]
        n_prev = min(p, window - 1)
        kv = keys[n_prev:n_prev + 1]
        rmsnorm_rows(xkv.reshape(1, -1), kv_norm, eps, True, True, kv)
        rope_rows(kv.reshape(1, 1, D), pos, freqs, False, True)
        quant_row(kv[0, :nope], kv[0, :nope], KV_BLOCK)

        n_comp = p // ratio if ratio > 0 else 0
        sel = np.empty((1, 0), np.int64)
        if ratio == 4:                  # indexer: its query, its key of a completed block, top-k
            Ih = xw.shape[0]
            Id = xqi.shape[0] // Ih
            qi = np.empty((1, Ih, Id), F32)
            _index_heads(xqi, cos, sin, qi)                                  # [1, Ih, Id]
            raw = np.empty(Id, F32)
            if _advance(index_st[0], index_st[1], index_st[2], index_st[3], index_w[1], True,
                        index[0], index[1], p, raw):
                first = p // 4
                k = np.empty((1, Id), F32)
                _finish_entry(raw, index_w[0], eps, first * 4, freqs, k)
                hadamard_rows(k, True)
                q4_rows(k, INDEX_BLOCK)
                write_kv_fp4_into(k, np.full(1, first, np.int64), INDEX_BLOCK, index[2], index[3])
            T = (p + 1) // 4
            if T > 0:
                wt = np.empty((1, Ih), F32)
                for h in range(Ih):
                    wt[0, h] = bf16(bf16(xw[h]) * wscale)
                scores = np.empty((1, T), F32)
                index_scores_into(ISA, qi, wt, index[2], index[3], np.empty((0, Id), F32), T, True, 1,
                                  scores)
                sel = np.empty((1, min(topk, T)), np.int64)
                topk_rows_into(scores, np.full(1, T, np.int64), sel.shape[1], sel)
        if ratio > 0:                   # the compressor: store a completed entry
            raw = np.empty(D, F32)
            if _advance(comp_st[0], comp_st[1], comp_st[2], comp_st[3], comp_w[1], ratio == 4,
                        comp[0], comp[1], p, raw):
                first = p // ratio
                e = np.empty((1, D), F32)
                _finish_entry(raw, comp_w[0], eps, first * ratio, freqs, e)
                quant_row(e[0, :nope], e[0, :nope], KV_BLOCK)
                write_kv_fp8_into(e, np.full(1, first, np.int64), KV_BLOCK, ring[3], ring[4], ring[5])
                n_comp = first + 1
            if ratio != 4:              # HCA: every visible entry
                sel = np.arange((p + 1) // ratio).reshape(1, -1)

        # keys: window ring rows (ascending positions) | this token | selected entries (ascending)
        ring_rows = np.empty(n_prev, np.int64)
        for i in range(n_prev):
            ring_rows[i] = (p - n_prev + i) % window
        if n_prev:
            read_kv_fp8_into(ring[0], ring[1], ring[2], ring_rows, KV_BLOCK, keys[:n_prev])
        n_sel = 0
        while n_sel < sel.shape[1] and sel[0, n_sel] >= 0:
            n_sel += 1
        n_keys = n_prev + 1 + n_sel
        if n_sel:
            read_kv_fp8_into(ring[3], ring[4], ring[5], sel[0, :n_sel].copy(), KV_BLOCK,
                             keys[n_prev + 1:n_keys])
        write_kv_fp8_into(kv, np.full(1, p % window, np.int64), KV_BLOCK, ring[0], ring[1], ring[2])

        cos, sin = _cos_sin(p, freqs, True)                  # then rope^-1(bf16(o)) per head
        attend_keys_into(ISA, q[0], keys[:n_keys], sink, F32(scale), nthreads, out[0], cos, sin, True)
        return n_comp
    # one name per variant (see gemv._driver on same-named cached closures)
    attend_one.__name__ = attend_one.__qualname__ = f"attend_one_{variant}"
    return njit(**_OPTS)(attend_one)


def attend_one_into(variant, *args):
    """attend_one_for(variant) (a string constant) from compiled code."""
    raise NotImplementedError("attend_one_into is only callable from Numba-compiled code")


@overload(attend_one_into, prefer_literal=True)
def _attend_one_into(variant, *args):
    fn = attend_one_for(ir.literal_string("attend_one_into: variant", variant))
    return lambda variant, *args: fn(*args)
