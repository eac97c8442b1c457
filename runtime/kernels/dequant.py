"""Weight dequantization into float32 scratch, for prefill GEMMs (then BLAS sgemm).

Each function fills `out[r, :]` for weight rows r0 .. r0+len(out)-1, exactly as
dsv4.quant.blocks.dequant_fp8_weight / dequant_fp4_weight and bf16 -> f32 do.
Rows are split over Numba's threads in one parallel region per call.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .bits import bits_f32 as u32_as_f32

_OPTS = dict(cache=True, fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
_PAR = dict(_OPTS, parallel=True)


@njit(**_OPTS)
def _pow2(k):
    return u32_as_f32(np.uint32((np.int32(k) + 127) << 23)) if -126 <= k <= 127 else np.float32(2.0) ** k


@njit(**_PAR)
def fp8_rows(w, s, r0, b0, b1, lut, out):
    """w uint8 [O, K] e4m3, s uint8 [ceil(O/b0), ceil(K/b1)] e8m0 -> out [n, K] f32;
    lut: the 256 e4m3 values."""
    n, K = out.shape
    for i in prange(n):
        r = r0 + i
        row = w[r]
        srow = s[r // b0]
        o = out[i]
        for kb in range(0, K, b1):
            e = np.int32(srow[kb // b1])
            scale = _pow2(e - 127) if e != 255 else np.float32(np.nan)
            hi = min(K, kb + b1)
            for k in range(kb, hi):
                o[k] = lut[row[k]] * scale


@njit(**_PAR)
def fp4_rows(w, s, r0, pairs, out):
    """w uint8 [O, K/2] packed e2m1 (low nibble first), s uint8 [O, K/32] -> out [n, K];
    pairs: float32 [256, 2], the two values of each byte (one table read per byte)."""
    n, K = out.shape
    for i in prange(n):
        r = r0 + i
        row = w[r]
        srow = s[r]
        o = out[i]
        for g in range(K // 32):
            e = np.int32(srow[g])
            scale = _pow2(e - 127) if e != 255 else np.float32(np.nan)
            for j in range(16):
                b = row[g * 16 + j]
                o[g * 32 + 2 * j] = pairs[b, 0] * scale
                o[g * 32 + 2 * j + 1] = pairs[b, 1] * scale


@njit(**_PAR)
def bf16_rows(w, r0, out):
    n, K = out.shape
    for i in prange(n):
        row = w[r0 + i]
        o = out[i]
        for k in range(K):
            o[k] = u32_as_f32(np.uint32(row[k]) << np.uint32(16))


@functools.lru_cache(maxsize=1)
def _fp4_pairs() -> np.ndarray:
    from dsv4.quant.formats import E2M1_VALUES  # noqa: PLC0415
    b = np.arange(256)
    return np.ascontiguousarray(np.stack([E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]], axis=1))


def dequant_rows(w, r0: int, n: int, out: np.ndarray) -> np.ndarray:
    """Rows r0 .. r0+n-1 of a LinearW (or a raw bf16/f32 matrix) as float32 into out[:n]."""
    from dsv4.quant.formats import E4M3_VALUES  # noqa: PLC0415
    buf = out[:n]
    fmt = getattr(w, "fmt", None)
    if fmt == "fp8":
        fp8_rows(w.weight.view(np.uint8), w.scale, r0, w.block[0], w.block[1], E4M3_VALUES, buf)
    elif fmt == "fp4":
        fp4_rows(w.weight.view(np.uint8), w.scale, r0, _fp4_pairs(), buf)
    else:
        raw = w.weight if fmt == "float" else w
        if raw.dtype == np.uint16:
            bf16_rows(raw, r0, buf)
        else:
            buf[...] = raw[r0:r0 + n]
    return buf
