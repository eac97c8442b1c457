"""A decode MoE step in three compiled calls around its two gemv regions.

The same operations and kernels as FastBackend._moe_decode's general path, without the
Python between them (~250 us per layer there): `stage1` quantizes x to FP8 and prepares
it for the FP4 integer layout and for the FP8 kernel, with the job arrays of w1/w3 of the
routed experts and the shared expert; the gemv driver runs them; `stage2` does the fused
SwiGLU (moe_glue.swiglu_rows) and prepares h with the w2 jobs; the driver runs them;
`stage3` sums. Results are bit-identical to the general path (tests compare them). (One
compiled call holding the driver as well could not be cached: Numba keys the cache on the
closure, and a dispatcher there differs in every process.)

Scope: the avx512 and avx2 variants with the model's activation quantization on (x and h
are then e4m3 values: the FP4 integer layout and the one-plane FP8 layout always apply),
FP4 routed experts and an FP8 shared expert. A stage reports ok = False when a row does
not fit the integer layout after all; the caller then takes the general path.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from . import prep
from .actq import quant_row
from .aligned import zeros_rows
from .moe_glue import combine_rows, swiglu_rows_par
from .prep_nb import bf16_gather_rows, fp4_int_rows, gather_rows

F32 = np.float32


@functools.cache
def x_layout(variant: str, K: int, b1: int) -> tuple:
    """The x preparation constants of the stages for one variant and K: (FP4 integer
    layout header, its length, FP8 slot index, FP8 as bf16 words (avx512; else floats),
    FP8 x scale, FP8 row length in floats)."""
    idx, scale = prep.layout(variant, "fp8", K, b1)
    words = variant == "avx512"
    return (prep.int_header(K), prep.int_len(K), np.ascontiguousarray(idx, np.int64), words, F32(scale),
            idx.size // 2 if words else idx.size)


@njit(cache=True, boundscheck=False, parallel=True)
def _prepare(x, n4, int_header, int_len, fp8_idx, fp8_words, fp8_scale, fp8_len, xcat, xinfo):
    """Rows [0, n4) of x in the FP4 integer layout (rows in parallel), the rest in the FP8
    layout, into the same rows of xcat (xinfo: nterms, length, format per row). False if
    FP4 does not fit."""
    n8 = x.shape[0] - n4
    t4 = np.empty((n4, int_len), np.float32)
    fits = np.empty(n4, np.bool_)
    for i in prange(n4):
        fits[i] = fp4_int_rows(x[i:i + 1], int_header, t4[i:i + 1])
    if not fits.all():
        return False
    for i in range(n4):
        xcat[i, :int_len] = t4[i]
        xinfo[i, 0], xinfo[i, 1], xinfo[i, 2] = 0, int_len, 0
    if fp8_words:
        w16 = np.empty((n8, fp8_idx.size), np.uint16)
        bf16_gather_rows(x[n4:], fp8_idx, w16)
        t8 = w16.view(np.float32)
    else:
        t8 = np.empty((n8, fp8_idx.size), np.float32)
        gather_rows(x[n4:], fp8_idx, fp8_scale, t8)
    for i in range(n8):
        xcat[n4 + i, :fp8_len] = t8[i]
        xinfo[n4 + i, 0], xinfo[n4 + i, 1], xinfo[n4 + i, 2] = 1, fp8_len, 1
    return True


@njit(cache=True, boundscheck=False)
def stage1(x, idx, w1r, w3r, s1, s3, qblock, int_header, int_len, fp8_idx, fp8_words, fp8_scale, fp8_len):
    """x [S, d] -> (ok, prepared x rows [2S, L], their info, matrix rows, x rows) of the
    w1/w3 jobs: routed gates, routed ups, shared gate, shared up (ok False: the caller
    takes the general path)."""
    S, k = idx.shape
    d = x.shape[1]
    nr = S * k
    xx = np.empty((2 * S, d), np.float32)                 # x for the FP4 rows, then for FP8
    for s in range(S):
        quant_row(x[s], xx[s], qblock)
    xx[S:] = xx[:S]
    xp = zeros_rows(2 * S, max(int_len, fp8_len))
    info = np.empty((2 * S, 3), np.int64)
    ok = _prepare(xx, S, int_header, int_len, fp8_idx, fp8_words, fp8_scale, fp8_len, xp, info)
    mats = np.empty(2 * (nr + S), np.int64)
    xsel = np.empty(2 * (nr + S), np.int64)
    for j in range(nr):
        e = idx[j // k, j % k]
        mats[j], mats[nr + j] = w1r[e], w3r[e]
        xsel[j] = xsel[nr + j] = j // k
    for s in range(S):
        mats[2 * nr + s], mats[2 * nr + S + s] = s1, s3
        xsel[2 * nr + s] = xsel[2 * nr + S + s] = S + s
    return ok, xp, info, mats, xsel


@njit(cache=True, boundscheck=False)
def stage2(gu, idx, wts, w2r, s2, inter, limit, shared_limit, wblock, rnd,
           int_header, int_len, fp8_idx, fp8_words, fp8_scale, fp8_len):
    """w1/w3 outputs (job order of stage1) -> SwiGLU h of every job, prepared for w2:
    (ok, prepared rows [n, L], info, matrix rows, x rows)."""
    S, k = idx.shape
    nr, n = S * k, S * k + S
    goff = np.empty(n, np.int64)
    uoff = np.empty(n, np.int64)
    lim = np.empty(n, np.float32)
    weight = np.empty(n, np.float32)
    mats = np.empty(n, np.int64)
    for j in range(n):
        shared = j >= nr
        goff[j] = (2 * nr + (j - nr) if shared else j) * inter
        uoff[j] = (2 * nr + S + (j - nr) if shared else nr + j) * inter
        lim[j] = shared_limit if shared else limit
        weight[j] = 1.0 if shared else wts[j // k, j % k]
        mats[j] = s2 if shared else w2r[idx[j // k, j % k]]
    h = np.empty((n, inter), np.float32)
    swiglu_rows_par(gu, goff, uoff, inter, lim, weight, rnd, wblock, h)
    xp = zeros_rows(n, max(int_len, fp8_len))
    info = np.empty((n, 3), np.int64)
    ok = _prepare(h, nr, int_header, int_len, fp8_idx, fp8_words, fp8_scale, fp8_len, xp, info)
    return ok, xp, info, mats, np.arange(n)


@njit(cache=True, boundscheck=False)
def stage3(y, idx, rnd, out):
    """w2 outputs of every job -> out [S, d]: a row's routed experts added in id order, then
    its shared expert (moe_glue.combine_rows)."""
    S, k = idx.shape
    d = out.shape[1]
    n = S * k + S
    order = np.empty((S, k), np.int64)
    for s in range(S):
        order[s] = np.argsort(idx[s], kind="mergesort") + s * k
    combine_rows(y, np.arange(n) * d, order, np.arange(S * k, n), rnd, out)
