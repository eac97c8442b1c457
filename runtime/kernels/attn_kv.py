"""Gather-and-decode of cached KV rows into float32, and the encoding writes into the
stores (the layouts of runtime/kv_cache.py).

- FP8 store: nope dims = e4m3 codes [R, N] with one int8 power-of-two exponent per `block`
  dims [R, ceil(N/block)] (the last block may be shorter), rope dims = bf16 bits [R, Rd].
  out[i] = concat(e4m3(codes[r]) * 2^exps[r, d // block], bf16(rope[r])) for r = rows[i],
  bit-identical to Fp8KVStore.read (NaN for codes 0x7F/0xFF, -0.0 for 0x80).
- bf16 store [R, D] and float32 store [R, D]: plain gathers.

Decode of an e4m3 byte without a table (kernel-notes, "sign-extend decode"): the byte
sign-extended to int32 and shifted left by 20 puts its sign on bit 31 and its 7 exponent and
mantissa bits on bits 26..20; masking with 0x87F00000 gives the float32 e4m3(b) * 2^-120,
also for the e4m3 subnormals (they land on float32 subnormals). The 2^120 is folded into the
block scale. Both multiplications are by powers of two, so each result is the correctly
rounded value of e4m3(b) * 2^k, as numpy's ldexp gives.

Writes are bit-identical to the stores' NumPy `write` (quant/blocks.py codecs). Per block:
k = ceil(log2(fp32(max(amax, floor) * fp32(1/M)))) read from the float32 bits, k = 0 when
the block holds inf or NaN (numpy's max propagates them and frexp gives exponent 0); then
each x * 2^-k (one correctly rounded multiply, as ldexp), clamped to +-M, is rounded to the
nearest code, ties to even. e4m3: NaN -> 0x7F; e2m1: NaN -> 6 (| 8 for a set sign bit),
the code the reference's searchsorted path gives.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attn_util import F32, U32, bf16_bits_to_f32, f32_as_u32, jit_opts, u32_as_f32

_NAN_BITS = U32(0x7FC00000)
_F32_MAX = F32(3.4028234663852886e38)
FP8_FLOOR, FP8_INV = F32(1e-4), F32(1.0 / 448.0)          # quant/blocks.py FP8_AMAX_FLOOR
FP4_FLOOR, FP4_INV = F32(6.0 * 2.0 ** -126), F32(1.0 / 6.0)


@njit(**jit_opts(fastmath=False), inline="always")
def _pow2(k):
    """2^k as float32 for integer k in [-126, 127] (exact)."""
    return u32_as_f32(U32(np.int32(k) + np.int32(127)) << U32(23))


@njit(**jit_opts(fastmath=False))
def _decode_block_shift(cb, ob, k):
    """ob[i] = e4m3(cb[i]) * 2^k for one block, by the sign-extend bit decode."""
    if k <= 7:                                    # 2^(k+120) is a normal float32
        s = _pow2(np.int32(k) + np.int32(120))
        for i in range(cb.size):
            c = cb[i]
            w = u32_as_f32((U32(np.int32(np.int8(c))) << U32(20)) & U32(0x87F00000))
            v = w * s
            ob[i] = u32_as_f32(_NAN_BITS) if (c & np.uint8(0x7F)) == np.uint8(0x7F) else v
    else:                                         # 2^(k+120) would overflow: two exact steps
        s = _pow2(k)
        for i in range(cb.size):
            c = cb[i]
            w = u32_as_f32((U32(np.int32(np.int8(c))) << U32(20)) & U32(0x87F00000))
            v = (w * F32(2.0 ** 120)) * s
            ob[i] = u32_as_f32(_NAN_BITS) if (c & np.uint8(0x7F)) == np.uint8(0x7F) else v


@njit(**jit_opts(fastmath=False))
def _scale_pow2(k):
    """2^k as float32 for int8 k (k = -127, -128 give exact subnormals)."""
    if k >= -126:
        return _pow2(k)
    return u32_as_f32(U32(1) << U32(np.int32(k) + np.int32(149)))


@njit(**jit_opts(fastmath=False))
def _decode_block_lut(cb, ob, k, lut):
    """ob[i] = lut[cb[i]] * 2^k (256-entry float table; the table lookups stay scalar)."""
    s = _scale_pow2(k)
    for i in range(cb.size):
        ob[i] = lut[cb[i]] * s


@njit(**jit_opts(parallel=True, fastmath=False))
def read_kv_fp8_into(codes, exps, rope, rows, block, out):
    """codes u8[R, N], exps i8[R, ceil(N/block)], rope u16[R, Rd], rows int64[n] ->
    out f32[n, N + Rd] (bit decode)."""
    n = rows.shape[0]
    N = codes.shape[1]
    Rd = rope.shape[1]
    nb = exps.shape[1]
    for i in prange(n):
        r = rows[i]
        crow = codes[r]
        erow = exps[r]
        orow = out[i]
        for b in range(nb):
            lo = b * block
            hi = min(lo + block, N)
            _decode_block_shift(crow[lo:hi], orow[lo:hi], erow[b])
        rrow = rope[r]
        otail = orow[N:N + Rd]
        for j in range(Rd):
            otail[j] = bf16_bits_to_f32(rrow[j])


@njit(**jit_opts(parallel=True, fastmath=False))
def read_kv_fp8_lut_into(codes, exps, rope, rows, block, lut, out):
    """As read_kv_fp8_into with a 256-entry float32 table `lut` (kept for measurement)."""
    n = rows.shape[0]
    N = codes.shape[1]
    Rd = rope.shape[1]
    nb = exps.shape[1]
    for i in prange(n):
        r = rows[i]
        crow = codes[r]
        erow = exps[r]
        orow = out[i]
        for b in range(nb):
            lo = b * block
            hi = min(lo + block, N)
            _decode_block_lut(crow[lo:hi], orow[lo:hi], erow[b], lut)
        rrow = rope[r]
        otail = orow[N:N + Rd]
        for j in range(Rd):
            otail[j] = bf16_bits_to_f32(rrow[j])


@njit(**jit_opts(parallel=True, fastmath=False))
def read_kv_bf16_into(data, rows, out):
    """data u16[R, D] (bf16 bits), rows int64[n] -> out f32[n, D]."""
    D = data.shape[1]
    for i in prange(rows.shape[0]):
        src = data[rows[i]]
        dst = out[i]
        for j in range(D):
            dst[j] = bf16_bits_to_f32(src[j])


@njit(**jit_opts(parallel=True, fastmath=False))
def read_kv_f32_into(data, rows, out):
    """data f32[R, D], rows int64[n] -> out f32[n, D]."""
    D = data.shape[1]
    for i in prange(rows.shape[0]):
        src = data[rows[i]]
        dst = out[i]
        for j in range(D):
            dst[j] = src[j]


# ------------------------------------------------------------------ writes (encode)
@njit(**jit_opts(fastmath=False), inline="always")
def _block_exp(xb, floor, inv):
    """Scale exponent k of one block xb [n]: ceil(log2(fp32(max(amax, floor) * inv)));
    0 if the block holds inf or NaN."""
    a = floor
    for i in range(xb.size):
        m = abs(xb[i])
        if not m <= _F32_MAX:                     # inf or NaN
            return np.int32(0)
        a = max(a, m)
    u = f32_as_u32(a * inv)                       # a positive normal float32
    e = np.int32(u >> U32(23)) - np.int32(127)
    return e + np.int32(1) if (u & U32(0x7FFFFF)) != U32(0) else e


@njit(**jit_opts(fastmath=False), inline="always")
def _e4m3_code(v):
    """float32 v -> e4m3 code: |v| clamped to 448, round to nearest even; NaN -> 0x7F."""
    sign = (f32_as_u32(v) >> U32(24)) & U32(0x80)
    m = min(abs(v), F32(448.0))                   # NaN: overridden below
    if m < F32(2.0 ** -6):                        # subnormal step 2^-9 (code 8 = 2^-6)
        c = U32(np.rint(m * F32(512.0)))
    else:                                         # keep 3 mantissa bits, rebias 127 -> 7
        b = f32_as_u32(m)
        c = ((b + U32(0x7FFFF) + ((b >> U32(20)) & U32(1))) >> U32(20)) - U32(120 << 3)
    return np.uint8(0x7F) if np.isnan(v) else np.uint8(c | sign)


@njit(**jit_opts(fastmath=False), inline="always")
def _e2m1_code(v):
    """float32 v -> 4-bit e2m1 code: |v| clamped to 6, round to nearest even; NaN -> 6."""
    sign = (f32_as_u32(v) >> U32(28)) & U32(8)
    m = abs(v)
    if m < F32(2.0):
        c = U32(np.rint(m * F32(2.0)))            # 0, .5, 1, 1.5, 2 -> codes 0..4
    elif m < F32(4.0):
        c = U32(2) + U32(np.rint(m))              # 2, 3, 4 -> codes 4..6
    elif m <= F32(5.0):
        c = U32(6)                                # (4, 5] -> 4 (5: a tie, even code)
    elif m <= _F32_MAX:
        c = U32(7)                                # 6, saturated
    else:
        c = U32(6) if np.isnan(m) else U32(7)     # NaN, inf
    return np.uint8(c | sign)


@njit(**jit_opts(fastmath=False), inline="always")
def _bf16_bits(v):
    """float32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0."""
    u = f32_as_u32(v)
    r = (u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) >> U32(16)
    return np.uint16(0x7FC0) if np.isnan(v) else np.uint16(r)


@njit(**jit_opts(fastmath=False), inline="always")
def _fp8_row(xr, crow, erow, rrow, block):
    """One row x [N + Rd] -> codes [N], exps [ceil(N/block)], rope bf16 bits [Rd]."""
    N = crow.size
    for b in range(erow.size):
        lo = b * block
        hi = min(lo + block, N)
        k = _block_exp(xr[lo:hi], FP8_FLOOR, FP8_INV)
        erow[b] = np.int8(k)
        down = _pow2(-k)                          # k in [-22, 120]: 2^-k is normal
        for i in range(lo, hi):
            crow[i] = _e4m3_code(xr[i] * down)
    for j in range(rrow.size):
        rrow[j] = _bf16_bits(xr[N + j])


@njit(**jit_opts(fastmath=False), inline="always")
def _fp4_row(xr, prow, erow, block):
    """One row x [D] (D a multiple of block, block even) -> packed [D/2], exps [D/block]."""
    for b in range(erow.size):
        lo = b * block
        k = _block_exp(xr[lo:lo + block], FP4_FLOOR, FP4_INV)
        erow[b] = np.int8(k)
        down = _pow2(-k)                          # k in [-126, 126]
        for i in range(lo, lo + block, 2):
            c0 = _e2m1_code(xr[i] * down)
            c1 = _e2m1_code(xr[i + 1] * down)
            prow[i >> 1] = c0 | (c1 << np.uint8(4))


@njit(**jit_opts(fastmath=False), inline="always")
def _bf16_row(xr, drow):
    for j in range(drow.size):
        drow[j] = _bf16_bits(xr[j])


# x f32[n, D], rows int64[n] (distinct in the parallel forms); row i of x -> store row rows[i]
@njit(**jit_opts(fastmath=False))
def write_kv_fp8_into(x, rows, block, codes, exps, rope):
    for i in range(rows.shape[0]):
        r = rows[i]
        _fp8_row(x[i], codes[r], exps[r], rope[r], block)


@njit(**jit_opts(parallel=True, fastmath=False))
def write_kv_fp8_par(x, rows, block, codes, exps, rope):
    for i in prange(rows.shape[0]):
        r = rows[i]
        _fp8_row(x[i], codes[r], exps[r], rope[r], block)


@njit(**jit_opts(fastmath=False))
def write_kv_fp4_into(x, rows, block, packed, exps):
    for i in range(rows.shape[0]):
        r = rows[i]
        _fp4_row(x[i], packed[r], exps[r], block)


@njit(**jit_opts(parallel=True, fastmath=False))
def write_kv_fp4_par(x, rows, block, packed, exps):
    for i in prange(rows.shape[0]):
        r = rows[i]
        _fp4_row(x[i], packed[r], exps[r], block)


@njit(**jit_opts(fastmath=False))
def write_kv_bf16_into(x, rows, data):
    for i in range(rows.shape[0]):
        _bf16_row(x[i], data[rows[i]])


@njit(**jit_opts(parallel=True, fastmath=False))
def write_kv_bf16_par(x, rows, data):
    for i in prange(rows.shape[0]):
        _bf16_row(x[i], data[rows[i]])
