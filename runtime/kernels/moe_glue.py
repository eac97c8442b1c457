"""The elementwise steps of a decode MoE step, fused (Numba): the router's scores and
top-k, between the w1/w3 and the w2 gemv regions, and after w2.

Same math as RefBackend.expert / moe_experts, job by job (a job = one expert applied to
one token row): g, u rounded to bf16; with a limit > 0, u clamped to [-limit, limit] and g
to at most limit; h = silu(g) * u (silu in float64, rounded to float32) times the routing
weight; h rounded to bf16, then FP8-quantized per block (the activation quantization of
w2). After w2: each job's output rounded to bf16, a token's routed outputs added in order
of expert id, then its shared expert's output.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .actq import quant_row
from .attn_util import exp_f32
from .glue import bf16

F32 = np.float32
_OPTS = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True)


@njit(inline="always")
def _rnd(v, rnd):
    return bf16(v) if rnd else F32(v)


@njit(**_OPTS)
def route_rows(logits, bias, hash_idx, k, scale, idx_out, w_out):
    """sqrt-softplus router, as moe.select_experts: logits [S, E] float32; bias [E] (added
    for the choice only); hash_idx [S, k] int64 (hash layer) or [0, k] (score-routed).
    -> idx_out [S, k] int64 (descending score, ties to the lower id), w_out [S, k]
    float32 = score / (float64 sum of the k scores) * scale."""
    S, E = logits.shape
    sc = np.empty(E, F32)
    key = np.empty(E, F32)
    taken = np.zeros(E, np.bool_)
    for s in range(S):
        for e in range(E):
            v = np.float64(logits[s, e])
            sp = F32(v if v > 20.0 else np.log1p(np.exp(min(v, 20.0))))
            sc[e] = np.sqrt(sp)
        if hash_idx.shape[0]:
            for t in range(k):
                idx_out[s, t] = hash_idx[s, t]
        else:
            for e in range(E):
                key[e] = sc[e] + bias[e]
                taken[e] = False
            for t in range(k):
                best = -1
                for e in range(E):
                    if not taken[e] and (best < 0 or key[e] > key[best]):
                        best = e
                taken[best] = True
                idx_out[s, t] = best
        tot = 0.0
        for t in range(k):
            tot += np.float64(sc[idx_out[s, t]])
        for t in range(k):
            w_out[s, t] = F32(np.float64(sc[idx_out[s, t]]) / tot) * F32(scale)


@njit(inline="always")
def silu(g):
    """g / (1 + e^-g) in float32 with the float32 exp of attn_util (exact to about 1 ulp,
    where the reference's float64 exp is exact to float32 rounding); branch-free."""
    e = np.float64(exp_f32(-abs(g)))                     # e^-|g| <= 1: never overflows
    g64 = np.float64(g)
    return F32((g64 if g >= 0 else g64 * e) / (1.0 + e))


@njit(inline="always")
def _swiglu_job(gu, goff, uoff, inter, limit, weight, rnd, qblock, out, j):
    lim, wj = F32(limit[j]), F32(weight[j])
    g_, u_, h = gu[goff[j]:goff[j] + inter], gu[uoff[j]:uoff[j] + inter], out[j]
    if lim > 0:
        for i in range(inter):
            g = min(_rnd(g_[i], rnd), lim)
            u = min(max(_rnd(u_[i], rnd), -lim), lim)
            h[i] = _rnd((silu(g) * u) * wj, rnd)
    else:
        for i in range(inter):
            h[i] = _rnd((silu(_rnd(g_[i], rnd)) * _rnd(u_[i], rnd)) * wj, rnd)
    if qblock > 0:
        quant_row(h, h, qblock)                           # in place: block max read first


@njit(**_OPTS)
def swiglu_rows(gu, goff, uoff, inter, limit, weight, rnd, qblock, out):
    """gu: w1 and w3 outputs of all jobs, flat float32; job j's gate is gu[goff[j]:
    goff[j] + inter], its up projection at uoff[j]; limit [n] (<= 0: no clamp); weight [n]
    routing weights (1 for the shared expert); qblock > 0: FP8-quantize each row in blocks
    of qblock (0: keep float32). -> out [n, inter]."""
    for j in range(goff.shape[0]):
        _swiglu_job(gu, goff, uoff, inter, limit, weight, rnd, qblock, out, j)


@njit(**_OPTS, parallel=True)
def swiglu_rows_par(gu, goff, uoff, inter, limit, weight, rnd, qblock, out):
    """swiglu_rows with the jobs in parallel (same values)."""
    for j in prange(goff.shape[0]):
        _swiglu_job(gu, goff, uoff, inter, limit, weight, rnd, qblock, out, j)


@njit(**_OPTS)
def combine_rows(y, yoff, order, shared_job, rnd, out):
    """y: w2 outputs of all jobs, flat float32 (job j at yoff[j], out.shape[1] long);
    order [S, k]: token s's routed jobs in the order they are added; shared_job [S]: its
    shared-expert job -> out [S, d] = sum of bf16(routed) + bf16(shared)."""
    S, k = order.shape
    d = out.shape[1]
    for s in range(S):
        o_s = out[s]
        for i in range(d):
            o_s[i] = 0.0
        for t in range(k + 1):        # the routed jobs in order, then the shared one
            o = yoff[order[s, t]] if t < k else yoff[shared_job[s]]
            ys = y[o:o + d]           # a 0-based loop over a slice vectorizes
            for i in range(d):
                o_s[i] += _rnd(ys[i], rnd)
