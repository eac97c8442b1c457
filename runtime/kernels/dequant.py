"""Weight dequantization into float32 scratch, for prefill GEMMs (then BLAS sgemm).

Each function fills `out[r, :]` for weight rows r0 .. r0+len(out)-1, exactly as
dsv4.quant.blocks.dequant_fp8_weight / dequant_fp4_weight and bf16 -> f32 do.
Rows are split over Numba's threads in one parallel region per call. `dequant_rows(...,
use_ir=True)` (the fast backend on avx2 / avx512 hosts) runs the MXFP4 and FP8 rows through
the AVX2 IR loops of ir_dequant.py instead: same values (a -0 weight of MXFP4 comes out
as +0), 1.8 (MXFP4) to 2.8 (FP8) times the rate, non-temporal stores for outputs past
NT_BYTES.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from . import ir, sources
from .bits import bits_f32 as u32_as_f32

_OPTS = dict(cache=True, fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
_PAR = dict(_OPTS, parallel=True)
IR_ROWS = 16                      # rows per IR call (a unit of the parallel loop)
NT_BYTES = 8 << 20                # outputs at least this large are written non-temporally


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


@functools.cache
def _ir_driver():
    DIGEST, ROWS = sources.digest(), IR_ROWS  # noqa: N806 - compile-time constants

    def rows_ir(fp8, w, s, r0, b0, b1, out, nt):
        """out [n, K] (rows contiguous, any row stride) = rows r0 .. of the MXFP4 (w [O, K/2],
        s [O, K/32]) or FP8 (w [O, K], s [bands, scols]) matrix, IR_ROWS rows per task."""
        assert DIGEST != ""
        n, K = out.shape
        ost = out.strides[0] // 4
        for c in prange((n + ROWS - 1) // ROWS):
            a = c * ROWS
            nr = min(ROWS, n - a)
            oa = np.uint64(out.ctypes.data + 4 * a * ost)
            if fp8:
                ir.ir_call("avx2", "dsv4_avx2_dequant_fp8",
                           (np.uint64(w.ctypes.data + (r0 + a) * w.strides[0]), np.uint64(s.ctypes.data), oa,
                            np.int64(nr), np.int64(K), np.int64(ost), np.int64(r0 + a), np.int64(b0), np.int64(b1),
                            np.int64(s.strides[0]), np.int64(nt)))
            else:
                ir.ir_call("avx2", "dsv4_avx2_dequant_fp4",
                           (np.uint64(w.ctypes.data + (r0 + a) * w.strides[0]),
                            np.uint64(s.ctypes.data + (r0 + a) * s.strides[0]), oa, np.int64(nr), np.int64(K),
                            np.int64(ost), np.int64(nt)))
    return njit(cache=True, parallel=True, boundscheck=False)(rows_ir)


def _ir_fits(fmt: str, w: np.ndarray, s: np.ndarray, K: int, block, out: np.ndarray) -> bool:
    """The IR loops' layout: weight and scale rows contiguous at their row strides, fp4 K a
    multiple of 32 with K/32 scales per row, out float32 with contiguous rows."""
    if out.dtype != np.float32 or out.strides[1] != 4 or out.strides[0] % 4 or w.strides[1] != 1 \
            or s.dtype.itemsize != 1 or s.ndim != 2 or s.strides[1] != 1:
        return False
    if fmt == "fp4":
        return K % 32 == 0 and w.shape[1] * 2 == K and s.shape[1] == K // 32 and w.strides[0] == K // 2
    return w.shape[1] == K and w.strides[0] == K and s.shape == (-(-w.shape[0] // block[0]), -(-K // block[1]))


def _nontemporal(out: np.ndarray, block) -> bool:
    """Large output whose 32-float stores all fall on 32-byte boundaries."""
    return (out.nbytes >= NT_BYTES and out.ctypes.data % 32 == 0 and out.strides[0] % 32 == 0
            and out.shape[1] % 8 == 0 and block[1] % 8 == 0)


@functools.lru_cache(maxsize=1)
def _fp4_pairs() -> np.ndarray:
    from dsv4.quant.formats import E2M1_VALUES  # noqa: PLC0415
    b = np.arange(256)
    return np.ascontiguousarray(np.stack([E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]], axis=1))


def dequant_rows(w, r0: int, n: int, out: np.ndarray, use_ir: bool = False) -> np.ndarray:
    """Rows r0 .. r0+n-1 of a LinearW (or a raw bf16/f32 matrix) as float32 into out[:n].
    use_ir: MXFP4 / FP8 rows through the AVX2 IR loops where the layout allows (the host must
    have AVX2 and FMA)."""
    from dsv4.quant.formats import E4M3_VALUES  # noqa: PLC0415
    buf = out[:n]
    fmt = getattr(w, "fmt", None)
    if use_ir and fmt in ("fp4", "fp8"):
        wb, block = w.weight.view(np.uint8), (w.block if fmt == "fp8" else (1, 32))
        if _ir_fits(fmt, wb, w.scale, w.in_features, block, buf):
            _ir_driver()(fmt == "fp8", wb, w.scale, r0, block[0], block[1], buf, _nontemporal(buf, block))
            return buf
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
