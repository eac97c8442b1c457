"""Attention of ONE query over its gathered keys, split over the keys (decode; spec 5.4.7).

Same result as attn_sparse.sparse_attn_into for S = 1 with every key valid, to float32
rounding: o[h] = sum_j e^(x_j - M) k_j / (sum_j e^(x_j - M) + e^(sink_h - M)), x_j =
f32(q[h] . k_j) * scale. The keys are cut into `n_parts(n)` consecutive parts (a number
that depends on n only). One parallel region computes, for each (part, block of heads):
the scores of the part's keys (the IR kernel dsv4_<isa>_attn_scores, or Numba loops for
the 'numba' variant), per head the part's maximum m_p and the sum l_p of e^(x - m_p), and
the weighted sum O_p = sum e^(x - m_p) k (dsv4_<isa>_attn_wsum). A second region combines
the parts per head: with M = max(sink, max_p m_p) and w_p = e^(m_p - M),
o = sum_p w_p O_p / (sum_p w_p l_p + e^(sink - M)).

Why split the keys rather than only the heads: each thread then reads only its own keys
(640 keys of 2 KB are more than a core's L2), and the register-blocked kernels run near the
FMA peak where the Numba loops of attn_sparse reach about half of it. How the heads of a
part are spread over threads changes no bit of the result; the number of parts does, and
it is fixed by n.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import ir, sources
from .attn_sparse import _scores, _weighted
from .attn_util import F32, exp_f32, jit_opts
from .glue import bf16, rope_vec

PART = 128                 # keys per part, about (n_parts)


@njit(cache=True)
def n_parts(n):
    """Parts of about PART keys (at least one)."""
    return max(1, (n + PART - 1) // PART)


@njit(cache=True)
def head_split(parts, H, nthreads):
    """Blocks of heads per part: the smallest power of two (blocks of at least 4 heads)
    that gives every thread a share, or that fills at least 4 items per thread."""
    s = 1
    while H // (2 * s) >= 4 and (parts * s) % nthreads != 0 and parts * s < 4 * nthreads:
        s *= 2
    return s


@njit(**jit_opts())
def _scores_nb(q, k, s, h0, h1):
    """s[h - h0, j] = q[h] . k[j] (attn_sparse's 2 x 4 blocked loops)."""
    _scores(q, k, np.arange(k.shape[0]), k.shape[0], h0, h1, s)


@njit(**jit_opts())
def _wsum_nb(p, k, o, h0, h1):
    """o[h] = sum_j p[h - h0, j] k[j] for h in [h0, h1)."""
    _weighted(p, k, np.arange(k.shape[0]), k.shape[0], h0, h1, o)


@njit(**jit_opts())
def _part_softmax(S, h0, h1, j0, j1, scale, m, l):
    """S[h, j0:j1] for h in [h0, h1): x = S * scale -> e^(x - max); m[h] = max, l[h] = the
    sum. (Rows taken as S[h][j0:j1], contiguous to Numba, so the loops vectorize.)"""
    for h in range(h0, h1):
        row = S[h][j0:j1]
        mx = F32(-np.inf)
        for j in range(row.shape[0]):
            x = row[j] * scale
            row[j] = x
            mx = max(mx, x)
        z = F32(0.0)
        for j in range(row.shape[0]):
            e = exp_f32(row[j] - mx)
            row[j] = e
            z += e
        m[h] = mx
        l[h] = z


@njit(**jit_opts(parallel=True))
def combine_parts(O, m, l, sink, out, cos, sin, rotate):
    """out [H, D] = sum_p w_p O[p] / (sum_p w_p l[p] + e^(sink - M)) per head (see module);
    rotate: then, per head, bf16-round it and apply the rotation (cos, sin) of the last
    2*len(cos) dims (the decode step's inverse RoPE, as glue.rope_rows with rounding)."""
    P, H, D = O.shape
    for h in prange(H):
        M = sink[h]
        for p in range(P):
            M = max(M, m[p, h])
        den = exp_f32(sink[h] - M)
        w = np.empty(P, F32)
        for p in range(P):
            w[p] = exp_f32(m[p, h] - M)
            den += w[p] * l[p, h]
        inv = F32(1.0) / den
        o = out[h]
        w0 = w[0] * inv
        src = O[0, h]
        for d in range(D):
            o[d] = w0 * src[d]
        for p in range(1, P):
            wp = w[p] * inv
            src = O[p, h]
            for d in range(D):
                o[d] += wp * src[d]
        if rotate:
            for d in range(D):
                o[d] = bf16(o[d])
            rope_vec(o, cos, sin, True)


def products(variant, which, a, k, c, h0, h1):
    """which 'scores': c[h - h0, j] = a[h] . k[j]; 'wsum': c[h] = sum_j a[h - h0, j] k[j],
    for h in [h0, h1): the IR kernels of `variant` (a string constant) or Numba loops."""
    raise NotImplementedError("products is only callable from Numba-compiled code")


@overload(products, prefer_literal=True)
def _products(variant, which, a, k, c, h0, h1):
    v, w = ir.literal_string("products: variant", variant), ir.literal_string("products: which", which)
    if v == "numba":
        return (lambda variant, which, a, k, c, h0, h1: _scores_nb(a, k, c, h0, h1)) if w == "scores" else \
            (lambda variant, which, a, k, c, h0, h1: _wsum_nb(a, k, c, h0, h1))
    name = f"dsv4_{v}_attn_{w}"
    if w == "scores":                    # a = q (all heads), c = s (the block's rows)
        def impl(variant, which, a, k, c, h0, h1):
            ir.ir_call(v, name, (np.uint64(a.ctypes.data + h0 * a.strides[0]), np.uint64(k.ctypes.data),
                                 np.uint64(c.ctypes.data), np.int64(h1 - h0), np.int64(k.shape[0]),
                                 np.int64(k.shape[1]), np.int64(a.strides[0] // 4), np.int64(k.strides[0] // 4),
                                 np.int64(c.strides[0] // 4)))
    else:                                # a = p (the block's rows), c = o (all heads)
        def impl(variant, which, a, k, c, h0, h1):
            ir.ir_call(v, name, (np.uint64(a.ctypes.data), np.uint64(k.ctypes.data),
                                 np.uint64(c.ctypes.data + h0 * c.strides[0]), np.int64(h1 - h0),
                                 np.int64(k.shape[0]), np.int64(k.shape[1]), np.int64(a.strides[0] // 4),
                                 np.int64(k.strides[0] // 4), np.int64(c.strides[0] // 4)))
    return impl


@functools.cache
def _parts(variant: str):
    """Region 1 of kernel variant `variant`: per (part, head block) the scores, the softmax
    pieces and the weighted sum."""
    ISA, DIGEST = variant, sources.digest()                 # compile-time constants

    def parts(q, keys, scale, nthreads, S, O, m, l):
        assert DIGEST != ""
        H = q.shape[0]
        n = keys.shape[0]
        P = O.shape[0]
        hs = head_split(P, H, nthreads)
        hb = (H + hs - 1) // hs
        for item in prange(P * hs):
            p = item // hs
            h0 = (item - p * hs) * hb
            h1 = min(h0 + hb, H)
            j0 = p * n // P
            j1 = (p + 1) * n // P
            if h0 >= h1:
                continue
            k = keys[j0:j1]
            s = S[h0:h1, j0:j1]
            products(ISA, "scores", q, k, s, h0, h1)
            _part_softmax(S, h0, h1, j0, j1, scale, m[p], l[p])
            products(ISA, "wsum", s, k, O[p], h0, h1)
    # one name per variant (see gemv._driver on same-named cached closures)
    parts.__name__ = parts.__qualname__ = f"attend_parts_{variant}"
    return njit(cache=True, parallel=True, boundscheck=False)(parts)


def attend_keys_into(variant, q, keys, sink, scale, nthreads, out, cos, sin, rotate):
    """attend_keys (below) of kernel variant `variant` (a string constant), from compiled code."""
    raise NotImplementedError("attend_keys_into is only callable from Numba-compiled code")


@overload(attend_keys_into, prefer_literal=True)
def _attend_keys_into(variant, q, keys, sink, scale, nthreads, out, cos, sin, rotate):
    parts = _parts(ir.literal_string("attend_keys_into: variant", variant))

    def impl(variant, q, keys, sink, scale, nthreads, out, cos, sin, rotate):
        n = keys.shape[0]
        H, D = q.shape
        if n == 0:
            out[:, :] = 0.0
            if rotate:                       # zeros stay zeros
                for h in range(H):
                    rope_vec(out[h], cos, sin, True)
            return
        P = n_parts(n)
        S = np.empty((H, n), F32)
        O = np.empty((P, H, D), F32)
        m = np.empty((P, H), F32)
        l = np.empty((P, H), F32)
        parts(q, keys, scale, nthreads, S, O, m, l)
        combine_parts(O, m, l, sink, out, cos, sin, rotate)
    return impl


@functools.cache
def attend_keys(variant: str):
    """The compiled attend_keys(q [H, D], keys [n, D], sink [H], scale, nthreads, out [H, D],
    cos, sin, rotate) of kernel variant `variant` ('avx512', 'avx2' or 'numba'); rows of q,
    keys and out contiguous. n = 0 gives out = 0. rotate: out is then bf16-rounded and
    rotated by (cos, sin) per head (combine_parts); else cos and sin are not read.

    Compiled code reaches it through attend_keys_into: Numba's cache key hashes a closure's
    captured values, and a captured dispatcher pickles differently in every process, so the
    closures here capture only strings and call each other through overloads on them."""
    ISA = variant                                           # compile-time constant

    def attend(q, keys, sink, scale, nthreads, out, cos, sin, rotate):
        attend_keys_into(ISA, q, keys, sink, scale, nthreads, out, cos, sin, rotate)
    attend.__name__ = attend.__qualname__ = f"attend_keys_{variant}"
    return njit(cache=True, boundscheck=False)(attend)
