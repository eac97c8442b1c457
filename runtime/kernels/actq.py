"""FP8 activation quantization in Numba, bit-identical to dsv4.quant.blocks.act_quant_values.

Per block of `block` values along the last axis (a shorter last block allowed):
a = max(max|x|, fp32(1e-4)); k = ceil(log2(fp32(a * fp32(1/448)))) read exactly from the
float32 bits; y = e4m3(clamp(x * 2^-k, -448, 448)) * 2^k, e4m3 rounding to nearest even
(subnormal step 2^-9, -0 kept for negative values that round to zero).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import bits_f32, f32_bits

F32 = np.float32
AMAX_FLOOR = F32(1e-4)
INV_MAX = F32(1.0 / 448.0)
PARALLEL_ROWS = 64          # fewer rows: one thread (a parallel region costs more than it saves)


@njit(inline="always")
def _pow2(k):
    """2^k as float32 for -149 <= k <= 127 (exact, subnormals included)."""
    if k >= -126:
        return bits_f32(np.uint32(k + 127) << np.uint32(23))
    return bits_f32(np.uint32(1) << np.uint32(k + 149))


@njit(inline="always")
def _ceil_log2(t):
    """Exact ceil(log2(t)) of a positive normal float32; 0 for inf / NaN (as frexp gives)."""
    u = f32_bits(t)
    e = np.int32((u >> np.uint32(23)) & np.uint32(0xFF))
    if e == 255:
        return np.int32(0)
    return e - np.int32(127) + (np.int32(1) if (u & np.uint32(0x7FFFFF)) != 0 else np.int32(0))


@njit(inline="always")
def _e4m3(v):
    """Round a float32 (|v| <= 448) to the nearest e4m3 value, ties to even. The spacing of
    e4m3 values near |v| is 2^k, k >= -9; dividing by it is multiplying by 2^-k (exact, and
    branch-free so the loops over a block vectorize)."""
    mag = abs(v)
    e = np.int32((f32_bits(mag) >> np.uint32(23)) & np.uint32(0xFF)) - np.int32(127)
    k = max(e, np.int32(-6)) - np.int32(3)
    step = bits_f32(np.uint32(k + np.int32(127)) << np.uint32(23))
    inv = bits_f32(np.uint32(np.int32(127) - k) << np.uint32(23))
    q = np.rint(mag * inv) * step
    return np.copysign(q, v)


@njit(inline="always")
def _quant_block(xb, ob, down, up):
    for i in range(xb.shape[0]):
        s = min(max(xb[i] * down, F32(-448.0)), F32(448.0))
        ob[i] = _e4m3(s) * up


@njit(inline="always")
def quant_row(x, out, block):
    """out = FP8 values of one row x [K] (blocks of `block`); inlined by callers. In place
    (out is x) the block loop is given one array: two views of the same memory fail the
    vectorizer's overlap check and ran the scalar loop, 4x slower."""
    K = x.shape[0]
    same = x.ctypes.data == out.ctypes.data
    for b0 in range(0, K, block):
        xb, ob = x[b0:min(K, b0 + block)], out[b0:min(K, b0 + block)]    # 0-based loops vectorize
        m = np.uint32(0)                 # max |x| as bits (same order; an integer max vectorizes)
        for i in range(xb.shape[0]):
            m = max(m, f32_bits(xb[i]) & np.uint32(0x7FFFFFFF))
        a = max(bits_f32(m), AMAX_FLOOR)
        k = _ceil_log2(a * INV_MAX)
        down, up = _pow2(-k), _pow2(k)
        if same:
            _quant_block(ob, ob, down, up)
        else:
            _quant_block(xb, ob, down, up)


@njit(cache=True, boundscheck=False)
def _serial(x, out, block):
    for r in range(x.shape[0]):
        quant_row(x[r], out[r], block)


@njit(cache=True, parallel=True, boundscheck=False)
def _parallel(x, out, block):
    for r in prange(x.shape[0]):
        quant_row(x[r], out[r], block)


def act_quant_values(x: np.ndarray, block: int = 128) -> np.ndarray:
    """x [..., K] -> float32 values of its FP8 (e4m3, power-of-two scale per `block`) form."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    a = np.ascontiguousarray(x, dtype=F32)
    x2 = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    out = np.empty_like(x2)
    (_parallel if x2.shape[0] >= PARALLEL_ROWS else _serial)(x2, out, int(block))
    return out.reshape(a.shape)
