"""Lightning-indexer scores (spec 5.4.4) over the packed FP4 key cache or float32 keys.

    score[s, t] = sum_h wt[s, h] * relu(qi[s, h] . k_t),   t < T

With `round_bf16` (default numerics) the roundings of the reference are reproduced: each dot
to float32 then bf16 (nearest even), each term relu(dot) * wt (a float32 product) to bf16, and
the head sum, taken in float64, to float32 then bf16.

Exactness. The dot is summed per block of 32 dims in float32 and the block sums are added in
float64. When qi and the keys are FP4-rounded (e2m1 x 2^k per 32, the default mode) every
product in a block is a multiple of 2^(kq + kk - 2) and a block sum is an integer below
32 * 36 * 4 = 4608 times that unit, so each float32 block sum is exact in any order, and the
float64 total is exact too: the result equals the reference's float64 einsum bit for bit
(barring float32 underflow of the products: kq + kk below about -120). For other inputs
(exact mode, float32 keys) the float32 block sums round like any float32 dot (~1e-7).

Layout of the work: one parallel region over (tile of _TB keys, block of `sb` queries).
A tile's keys are decoded once into a transposed, 64-byte aligned float32 buffer
kT[Id, _TB] (values e2m1 * 2^kk, exact; columns past the last key are 0), so the inner loop
runs over keys with a compile-time trip count and constant row offsets:
    out[j] (+)= sum_{i<16} q[d0 + i] * kT[d0 + i, j]      (16 broadcasts, 4 FMA chains)
The (block, head) loop order keeps a block's 32 key rows (16 KB) in L1 across all heads.
Block sums go to part[b, h, :] (index_scores_for: by an IR kernel or Numba loops); a
vectorized epilogue per head combines them.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import ir, sources

from .attn_util import F32, U32, bf16_round, jit_opts, u32_as_f32

_TB = 128          # keys per tile (compile-time constant: constant offsets in _dot16)
_BLK = 32          # block of the float32 partial sums (the FP4 scale block)


@njit(**jit_opts(fastmath=False))
def _aligned_f32(n):
    """Uninitialised float32[n] whose data starts on a 64-byte boundary."""
    buf = np.empty(n + 16, F32)
    off = ((64 - buf.ctypes.data % 64) % 64) // 4
    return buf[off:off + n]


@njit(**jit_opts(fastmath=False))
def _pow2(k):
    """2^k as float32 for an int8 exponent k (exact; subnormal below -126)."""
    k = np.int32(k)
    normal = u32_as_f32(U32(U32(k + np.int32(127)) << U32(23)))
    sub = u32_as_f32(U32(U32(1) << U32(max(k + np.int32(149), np.int32(0)))))
    return normal if k >= np.int32(-126) else sub


@njit(**jit_opts(fastmath=False), inline="always")
def _e2m1_bits(nib):
    """e2m1 code (uint32 0..15) -> float32 bits of its value. Magnitude code m >= 2 is
    2^((m >> 1) - 1) * (1 + (m & 1)/2), whose bits are exactly (m + 252) << 22."""
    m = U32(nib & U32(7))
    mag = U32(U32(m + U32(252)) << U32(22))
    mag = U32(0x3F000000) if m == U32(1) else mag
    mag = U32(0) if m == U32(0) else mag
    return U32(mag | U32(U32(nib & U32(8)) << U32(28)))


@njit(**jit_opts(fastmath=False))
def _decode_fp4_tile(packed, exps, t0, n, kT):
    """kT[d*_TB + j] = e2m1(nibble d of key t0 + j) * 2^exps[t0 + j, d // 32] (exact), and 0
    for n <= j < _TB. The packed rows are transposed as 32-bit words (8 nibbles each), then
    each word row is decoded with integer SIMD (no table lookups)."""
    nw = packed.shape[1] // 4
    nb = exps.shape[1]
    sc = np.zeros(nb * _TB, F32)
    for j in range(n):
        erow = exps[t0 + j]
        for b in range(nb):
            sc[b * _TB + j] = _pow2(erow[b])
    words = packed[t0:t0 + n].view(np.uint32)              # [n, nw], little-endian
    wT = np.zeros(nw * _TB, np.uint32)
    for j in range(n):
        for c in range(nw):
            wT[c * _TB + j] = words[j, c]
    for c in range(nw):
        w = wT[c * _TB:(c + 1) * _TB]
        s = sc[((8 * c) // _BLK) * _TB:((8 * c) // _BLK + 1) * _TB]
        for k in range(8):
            o = kT[(8 * c + k) * _TB:(8 * c + k + 1) * _TB]
            sh = U32(4 * k)
            for j in range(_TB):
                o[j] = u32_as_f32(_e2m1_bits(U32(U32(w[j] >> sh) & U32(15)))) * s[j]


@njit(**jit_opts(fastmath=False))
def _copy_f32_tile(keys, t0, n, kT):
    Id = keys.shape[1]
    for d in range(Id):
        row = kT[d * _TB:(d + 1) * _TB]
        for j in range(n):
            row[j] = keys[t0 + j, d]
        for j in range(n, _TB):
            row[j] = 0.0


@njit(**jit_opts())
def _dot16(qh, d0, kb, out, first):
    """out[j] (+)= sum_{i<16} qh[d0 + i] * kb[i*_TB + j] for j < _TB."""
    q0, q1, q2, q3 = qh[d0], qh[d0 + 1], qh[d0 + 2], qh[d0 + 3]
    q4, q5, q6, q7 = qh[d0 + 4], qh[d0 + 5], qh[d0 + 6], qh[d0 + 7]
    q8, q9, q10, q11 = qh[d0 + 8], qh[d0 + 9], qh[d0 + 10], qh[d0 + 11]
    q12, q13, q14, q15 = qh[d0 + 12], qh[d0 + 13], qh[d0 + 14], qh[d0 + 15]
    for j in range(_TB):
        c0 = (q0 * kb[j] + q1 * kb[_TB + j]
              + q2 * kb[2 * _TB + j] + q3 * kb[3 * _TB + j])
        c1 = (q4 * kb[4 * _TB + j] + q5 * kb[5 * _TB + j]
              + q6 * kb[6 * _TB + j] + q7 * kb[7 * _TB + j])
        c2 = (q8 * kb[8 * _TB + j] + q9 * kb[9 * _TB + j]
              + q10 * kb[10 * _TB + j] + q11 * kb[11 * _TB + j])
        c3 = (q12 * kb[12 * _TB + j] + q13 * kb[13 * _TB + j]
              + q14 * kb[14 * _TB + j] + q15 * kb[15 * _TB + j])
        if first:
            out[j] = (c0 + c1) + (c2 + c3)
        else:
            out[j] += (c0 + c1) + (c2 + c3)


@njit(**jit_opts())
def _tile_products_nb(qs, kT, part):
    """part[(b * Ih + h) * _TB + j] = block b's sum of qs[h, d] * kT[d * _TB + j] (Numba)."""
    Ih, Id = qs.shape
    for b in range(Id // _BLK):
        kb0 = kT[(b * _BLK) * _TB:(b * _BLK + 16) * _TB]
        kb1 = kT[(b * _BLK + 16) * _TB:(b * _BLK + 32) * _TB]
        for h in range(Ih):
            out = part[(b * Ih + h) * _TB:(b * Ih + h + 1) * _TB]
            _dot16(qs[h], b * _BLK, kb0, out, True)
            _dot16(qs[h], b * _BLK + 16, kb1, out, False)


@njit(**jit_opts())
def _tile_scores(ws, part, nb, round_bf16, d64, acc, osc):
    """Scores of one query (head weights ws f32[Ih]) from its block sums `part` -> osc[:n]."""
    Ih = ws.shape[0]
    acc[:] = 0.0
    for h in range(Ih):
        w = ws[h]
        if nb == 4:                                     # Id = 128 (Flash, Pro): one pass
            p0 = part[h * _TB:(h + 1) * _TB]
            p1 = part[(Ih + h) * _TB:(Ih + h + 1) * _TB]
            p2 = part[(2 * Ih + h) * _TB:(2 * Ih + h + 1) * _TB]
            p3 = part[(3 * Ih + h) * _TB:(3 * Ih + h + 1) * _TB]
            for j in range(_TB):
                d64[j] = ((np.float64(p0[j]) + np.float64(p1[j]))
                          + (np.float64(p2[j]) + np.float64(p3[j])))
        else:
            p = part[h * _TB:(h + 1) * _TB]
            for j in range(_TB):
                d64[j] = np.float64(p[j])
            for b in range(1, nb):
                p = part[(b * Ih + h) * _TB:(b * Ih + h + 1) * _TB]
                for j in range(_TB):
                    d64[j] += np.float64(p[j])
        if round_bf16:
            for j in range(_TB):
                term = max(bf16_round(F32(d64[j])), F32(0.0)) * w
                acc[j] += np.float64(bf16_round(term))
        else:
            for j in range(_TB):
                acc[j] += np.float64(max(F32(d64[j]), F32(0.0)) * w)
    if round_bf16:
        for j in range(osc.size):
            osc[j] = bf16_round(F32(acc[j]))
    else:
        for j in range(osc.size):
            osc[j] = F32(acc[j])


def tile_products(variant, qs, kT, part):
    """part[(b * Ih + h) * _TB + j] = block b's sum of qs[h, d] * kT[d * _TB + j]: the IR
    kernel dsv4_<variant>_index_tile, or Numba loops for 'numba' (a string constant)."""
    raise NotImplementedError("tile_products is only callable from Numba-compiled code")


@overload(tile_products, prefer_literal=True)
def _tile_products(variant, qs, kT, part):
    v = ir.literal_string("tile_products: variant", variant)
    if v == "numba":
        return lambda variant, qs, kT, part: _tile_products_nb(qs, kT, part)
    name = f"dsv4_{v}_index_tile"

    def impl(variant, qs, kT, part):
        ir.ir_call(v, name, (np.uint64(qs.ctypes.data), np.uint64(kT.ctypes.data), np.uint64(part.ctypes.data),
                             np.int64(qs.shape[0]), np.int64(qs.shape[1]), np.int64(_TB)))
    return impl


def index_scores_into(variant, qi, wt, packed, exps, keys, T, round_bf16, sb, out):
    """index_scores_for(variant) (a string constant) from compiled code."""
    raise NotImplementedError("index_scores_into is only callable from Numba-compiled code")


@overload(index_scores_into, prefer_literal=True)
def _index_scores_into(variant, qi, wt, packed, exps, keys, T, round_bf16, sb, out):
    fn = index_scores_for(ir.literal_string("index_scores_into: variant", variant))
    return lambda variant, qi, wt, packed, exps, keys, T, round_bf16, sb, out: \
        fn(qi, wt, packed, exps, keys, T, round_bf16, sb, out)


@functools.cache
def index_scores_for(variant: str):
    """The compiled index_scores(qi, wt, packed, exps, keys, T, round_bf16, sb, out) of kernel
    variant `variant`: the block sums of a tile by the IR kernel dsv4_<isa>_index_tile
    ('avx512', 'avx2') or by Numba loops ('numba'). In the default mode every block sum is
    exact, so all variants give the same bits.

    qi f32[S, Ih, Id] (Id % 32 == 0), wt f32[S, Ih]; keys either packed u8[Rows, Id/2] +
    exps i8[Rows, Id/32] (with `keys` of 0 rows) or keys f32[Rows, Id] (with `packed` of 0
    rows); T <= Rows keys scored, `sb` queries per work item -> out f32[S, T]."""
    DIGEST, ISA = sources.digest(), variant                 # compile-time constants

    def index_scores(qi, wt, packed, exps, keys, T, round_bf16, sb, out):
        assert DIGEST != ""
        S, Ih, Id = qi.shape
        nt = (T + _TB - 1) // _TB
        ns = (S + sb - 1) // sb
        fp4 = packed.shape[0] > 0
        nb = Id // _BLK
        for item in prange(nt * ns):
            it = item // ns
            s0 = (item - it * ns) * sb
            t0 = it * _TB
            n = min(_TB, T - t0)
            kT = _aligned_f32(Id * _TB)
            if fp4:
                _decode_fp4_tile(packed, exps, t0, n, kT)
            else:
                _copy_f32_tile(keys, t0, n, kT)
            part = _aligned_f32(nb * Ih * _TB)
            d64 = np.empty(_TB, np.float64)
            acc = np.empty(_TB, np.float64)
            for s in range(s0, min(s0 + sb, S)):
                tile_products(ISA, qi[s], kT, part)
                _tile_scores(wt[s], part, nb, round_bf16, d64, acc, out[s, t0:t0 + n])
    # one name per variant (see gemv._driver on same-named cached closures)
    index_scores.__name__ = index_scores.__qualname__ = f"index_scores_{variant}"
    return njit(**jit_opts(parallel=True))(index_scores)
