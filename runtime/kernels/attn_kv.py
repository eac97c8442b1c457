"""Gather-and-decode of cached KV rows into float32 (the layouts of runtime/kv_cache.py).

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
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attn_util import F32, U32, bf16_bits_to_f32, jit_opts, u32_as_f32

_NAN_BITS = U32(0x7FC00000)


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
