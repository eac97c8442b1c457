"""Scalar helpers shared by the attention kernels: bit casts, bf16 rounding, a SIMD-friendly exp.

All are small `@njit` functions that LLVM inlines into the calling loops; written branch-free
(selects only) so the loops that call them still vectorize.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import bits_f32, f32_bits


def jit_opts(parallel: bool = False, fastmath: bool = True) -> dict:
    """Options for @njit: cached, no bounds checks, numpy error model. The fast-math set
    allows reassociation (SIMD reductions) and contraction (FMA) but not 'nnan'/'ninf', so
    comparisons with inf/NaN keep their IEEE meaning."""
    fm = {"reassoc", "contract", "arcp", "nsz", "afn"} if fastmath else False
    return dict(cache=True, fastmath=fm, boundscheck=False, error_model="numpy",
                parallel=parallel)


F32 = np.float32
U32 = np.uint32


# bit reinterpretation (one implementation, in bits.py)
u32_as_f32 = bits_f32
f32_as_u32 = f32_bits


@njit(**jit_opts(fastmath=False), inline="always")
def bf16_round(x):
    """float32 -> nearest bf16 value (ties to even) as float32; NaN -> quiet NaN 0x7FC00000.
    Same bits as quant.formats.bf16_round."""
    u = f32_as_u32(x)
    r = (u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) & U32(0xFFFF0000)
    r = U32(0x7FC00000) if (u & U32(0x7FFFFFFF)) > U32(0x7F800000) else r
    return u32_as_f32(r)


@njit(**jit_opts(fastmath=False), inline="always")
def bf16_bits_to_f32(b):
    """uint16 bf16 bit pattern -> float32 (exact)."""
    return u32_as_f32(U32(b) << U32(16))


_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)            # 8 significant bits: n * _LN2_HI is exact for |n| < 2^15
_LN2_LO = F32(-2.12194440e-4)         # ln 2 - _LN2_HI


@njit(cache=True, fastmath={"contract"}, boundscheck=False, error_model="numpy")
def exp_f32(x):
    """e^x in float32 for x <= 0 (softmax weights), max error about 1 ulp; 0 below -87.
    Range reduction x = n ln2 + r (Cody-Waite, |r| <= ln2/2), degree-7 Taylor on r, 2^n
    from the exponent bits. No reassociation here, so the two-step reduction stays exact."""
    xc = max(x, F32(-87.0))
    n = np.floor(xc * _LOG2E + F32(0.5))
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = F32(1.0 / 5040.0)
    p = p * r + F32(1.0 / 720.0)
    p = p * r + F32(1.0 / 120.0)
    p = p * r + F32(1.0 / 24.0)
    p = p * r + F32(1.0 / 6.0)
    p = p * r + F32(0.5)
    p = p * r + F32(1.0)
    p = p * r + F32(1.0)
    scale = u32_as_f32(U32(np.int32(n) + np.int32(127)) << U32(23))
    y = p * scale
    return F32(0.0) if x < F32(-87.0) else y
