"""Prefill GEMM on AVX-512 BF16 for MXFP4 and FP8 weights: out = x W^T with vdpbf16ps.

When x is exact in bf16 (e4m3-quantized activations: the model's default rounding steps)
and every e8m0 scale of W is in ir_gemm.SCALE_RANGE, both operands are bf16 numbers,
so the bf16 dot-product instruction computes what a float32 GEMM of the dequantized weight
computes, to accumulation order (products below 2^-126 are flushed, as the instruction
does; such products are far below float32 rounding of any normal output). It runs at twice
the float32 FMA rate and needs no float32 copy of the weight: each work unit decodes 8
weight rows to bf16 (64 KB at K = 4096, cache-resident) and sweeps them over a block of
packed x (ir_gemm.py). Anything else returns None and the caller uses dequantize + sgemm.

x is packed once per call as bf16 pairs, xp[k / 2, m] (uint32), m padded to 16 lanes; each
work unit transposes its small C^T block into the row-major [M, O] output (which may be a
column range of a wider buffer, e.g. w1 and w3 side by side).
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from . import cpu, ir, ir_amx, ir_gemm, sources
from .bits import f32_bits, fetch_add

TILE_LANES = ir_gemm.LANES * ir_gemm.MAX_NJ     # token lanes per tile call
AMX_TILE_LANES = ir_gemm.LANES * ir_amx.NJ      # the same with AMX tiles
X_BLOCK_BYTES = 768 * 1024                      # packed x per work unit (L2-resident)


@njit(cache=True)
def pack_x(x, xp) -> bool:
    """x float32 [M, K] (any strides) -> xp uint32 [K / 2, mpad] bf16 pairs (lanes >= M
    zeroed). Returns False when some value is not a zero or a normal number exact in bf16."""
    M, K = x.shape
    low, expo, mag = np.uint32(0xFFFF), np.uint32(0x7F800000), np.uint32(0x7FFFFFFF)
    for p in range(K // 2):
        bad = np.uint32(0)
        for m in range(M):
            a = f32_bits(x[m, 2 * p])
            b = f32_bits(x[m, 2 * p + 1])
            # not exact: low half set, or a nonzero value with a zero exponent field
            bad |= (a & low) | (b & low)
            bad |= np.uint32((a & expo) == 0 and (a & mag) != 0)
            bad |= np.uint32((b & expo) == 0 and (b & mag) != 0)
            xp[p, m] = (a >> np.uint32(16)) | (b & np.uint32(0xFFFF0000))
        if bad:
            return False
        for m in range(M, xp.shape[1]):
            xp[p, m] = 0
    return True


@functools.cache
def _packer():
    DIGEST = sources.digest()  # noqa: N806

    def pack_rows(x, xp, bad):
        """pack_x for x with contiguous rows and K a multiple of 32 (ir_gemm's vector
        packing, 16 rows x 16 pairs per step); bad[0] != 0 when x is not exact in bf16."""
        assert DIGEST != ""
        M, K = x.shape
        ir.ir_call("avx512", "dsv4_avx512_pack_bf16",
                   (np.uint64(x.ctypes.data), np.int64(x.strides[0] // 4), np.int64(M), np.int64(K),
                    np.uint64(xp.ctypes.data), np.int64(xp.shape[1]), np.uint64(bad.ctypes.data)))
    return njit(cache=True, boundscheck=False)(pack_rows)


@functools.cache
def _driver():
    DIGEST, LANES, MAX_NJ, AMX_NJ = sources.digest(), ir_gemm.LANES, ir_gemm.MAX_NJ, ir_amx.NJ  # noqa: N806
    AVX_MR, AMX_MR = ir_gemm.MR, ir_amx.ROWS  # noqa: N806

    def gemm_bf16(fp8, waddr, saddr, O, K, b0, b1, scols, xp, M, mblk, out, wbuf, cbuf, amx):
        """out [M, O] float32 (rows may be strided) = x times the MXFP4 (fp8 False) or FP8
        (b0 x b1 tile scales, scols per band) matrix at (waddr, saddr) [O, K], x packed;
        work units (x block of mblk lanes, mr = 8 weight rows, 16 with AMX tiles) come from
        a shared counter. Per thread: wbuf [t] (mr * K uint16) the decoded rows, cbuf [t]
        (mr * mblk float32) the unit's C^T block, transposed into out at the end of the unit."""
        assert DIGEST != ""
        mr = AMX_MR if amx else AVX_MR
        mpad = xp.shape[1]                            # the row stride; lanes >= mlanes are padding
        mlanes = (M + LANES - 1) // LANES * LANES
        nob = (O + mr - 1) // mr
        nmb = (M + mblk - 1) // mblk
        total = nob * nmb
        nthreads = max(1, min(wbuf.shape[0], total))
        counter = np.zeros(16, np.int64)
        xa = np.uint64(xp.ctypes.data)
        for t in prange(nthreads):
            wb = np.uint64(wbuf[t].ctypes.data)
            ct = cbuf[t]
            cb = np.uint64(ct.ctypes.data)
            while True:
                u = fetch_add(counter, 0, 1)
                if u >= total:
                    break
                mb = u // nob                         # x block outer: consecutive units share it
                o0 = (u - mb * nob) * mr
                nr = min(mr, O - o0)
                if fp8:
                    ir.ir_call("avx512", "dsv4_avx512_fp8_bf16",
                               (waddr + np.uint64(o0 * K), saddr, wb, np.int64(nr), np.int64(K),
                                np.int64(o0), np.int64(b0), np.int64(b1), np.int64(scols)))
                else:
                    ir.ir_call("avx512", "dsv4_avx512_fp4_bf16",
                               (waddr + np.uint64(o0 * (K // 2)), saddr + np.uint64(o0 * (K // 32)), wb,
                                np.int64(nr), np.int64(K)))
                mlo = mb * mblk
                m_end = min(mlanes, mlo + mblk)
                if amx:                               # all 16 rows computed, rows >= nr not copied
                    for m0 in range(mlo, m_end, LANES * AMX_NJ):
                        nj = min(AMX_NJ, (m_end - m0) // LANES)
                        ir.ir_call("avx512", "dsv4_avx512_amx_tile",
                                   (wb, np.int64(K), xa + np.uint64(4 * m0), np.int64(mpad),
                                    cb + np.uint64(4 * (m0 - mlo)), np.int64(mblk), np.int64(nj)))
                else:
                    for m0 in range(mlo, m_end, LANES * MAX_NJ):
                        nj = min(MAX_NJ, (m_end - m0) // LANES)
                        ir.ir_call("avx512", "dsv4_avx512_bf16_tile",
                                   (wb, np.int64(K), np.int64(nr), xa + np.uint64(4 * m0), np.int64(mpad),
                                    cb + np.uint64(4 * (m0 - mlo)), np.int64(mblk), np.int64(nj)))
                for m in range(mlo, min(M, m_end)):
                    for r in range(nr):
                        out[m, o0 + r] = ct[r * mblk + m - mlo]
    return njit(cache=True, parallel=True, boundscheck=False)(gemm_bf16)


def padded_lanes(M: int) -> int:
    """Lanes per pair row of packed x: M rounded up to 16, plus 16 more when the row stride
    would be a multiple of 256 bytes. The tile kernel reads a few lines from each of
    thousands of consecutive rows; at such strides they fall into a few cache sets and evict
    each other (M = 512: 52 instead of 92 GF/s on one Intel core)."""
    lanes = -(-M // ir_gemm.LANES) * ir_gemm.LANES
    return lanes + ir_gemm.LANES if lanes % 64 == 0 else lanes


def x_block_lanes(K: int, tile_lanes: int = TILE_LANES) -> int:
    """Token lanes per work unit: packed x of the unit within X_BLOCK_BYTES, >= one tile."""
    lanes = X_BLOCK_BYTES // (2 * K) // tile_lanes * tile_lanes
    return max(tile_lanes, lanes)


class PackedX:
    """x [M, K] packed once for all the matrices it multiplies (see pack)."""

    def __init__(self, xp: np.ndarray, M: int):
        self.xp, self.M = xp, M

    @classmethod
    def pack(cls, x: np.ndarray) -> "PackedX | None":
        """None when x (float32 [M, K], any strides) is not exact in bf16 or K is odd."""
        M, K = x.shape
        if K % 2 or M == 0 or x.dtype != np.float32:
            return None
        xp = np.empty((K // 2, padded_lanes(M)), np.uint32)
        if K % 32 == 0 and x.strides[1] == 4 and x.strides[0] % 4 == 0:
            bad = np.zeros(1, np.int64)
            _packer()(x, xp, bad)
            return None if bad[0] else cls(xp, M)
        return cls(xp, M) if pack_x(x, xp) else None


def _layout_ok(fmt: str, K: int, block: tuple[int, int]) -> bool:
    """MXFP4, or FP8 with K and b1 multiples of 64."""
    return fmt in ir_gemm.SCALE_RANGE and not (fmt == "fp8" and (K % 64 or block[1] % 64))


def fits(fmt: str, K: int, scale: np.ndarray, block: tuple[int, int]) -> bool:
    """The kernels take this matrix: MXFP4 or FP8 (K and b1 multiples of 64) with every
    e8m0 byte keeping the decoded weights normal bf16 numbers (a scan of the scales: the
    backend checks once per weight)."""
    if not _layout_ok(fmt, K, block):
        return False
    lo, hi = ir_gemm.SCALE_RANGE[fmt]
    s = scale.view(np.uint8)
    return bool(s.size) and int(s.min()) >= lo and int(s.max()) <= hi


def gemm_into(px: PackedX, fmt: str, weight: np.ndarray, scale: np.ndarray, out: np.ndarray,
              block: tuple[int, int] = (128, 128), amx: bool | None = None) -> None:
    """out [M, O] float32 (unit column stride, any row stride: e.g. a column range of a
    bigger buffer) = x W^T for an MXFP4 (weight [O, K/2] bytes, scale e8m0 [O, K/32]) or
    FP8 (weight [O, K] e4m3, scale e8m0 [ceil(O/b0), ceil(K/b1)]) matrix that `fits` (the
    scale range is the caller's check, made once per weight; shapes are checked here).
    `amx`: use AMX tiles (default: where cpu.amx_ready() and K % 32 == 0; True elsewhere
    is refused)."""
    fp8 = fmt == "fp8"
    O, K = weight.shape[0], weight.shape[1] * (1 if fp8 else 2)
    want = (-(-O // block[0]), -(-K // block[1])) if fp8 else (O, K // 32)
    if not _layout_ok(fmt, K, block) or scale.shape != want or px.xp.shape[0] != K // 2:
        raise ValueError("gemm_into: shapes or layout do not match the kernels")
    if out.dtype != np.float32 or out.shape != (px.M, O) or out.strides[1] != 4 or out.strides[0] % 4:
        raise ValueError("gemm_into: out must be float32 [M, O] with contiguous rows")
    w = np.ascontiguousarray(weight).view(np.uint8)
    s = np.ascontiguousarray(scale).view(np.uint8)
    if amx is None:
        amx = K % 32 == 0 and cpu.amx_ready()             # A tiles step 32 k at a time
    elif amx and (K % 32 or not cpu.amx_ready()):
        raise ValueError("gemm_into: AMX tiles need K % 32 == 0 and a host that has them")
    mr = ir_amx.ROWS if amx else ir_gemm.MR
    nthreads, mblk = numba.config.NUMBA_NUM_THREADS, x_block_lanes(K, AMX_TILE_LANES if amx else TILE_LANES)
    wbuf = np.empty((nthreads, mr * K), np.uint16)
    cbuf = np.empty((nthreads, mr * mblk), np.float32)
    _driver()(fp8, np.uint64(w.ctypes.data), np.uint64(s.ctypes.data), O, K, block[0], block[1],
              s.shape[1], px.xp, px.M, mblk, out, wbuf, cbuf, bool(amx))
