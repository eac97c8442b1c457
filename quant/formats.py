"""The number formats of the official checkpoint as data, with pure-NumPy codecs.

These codecs are the specification the fast kernels are tested against:
- e4m3 (OCP float8 e4m3fn): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, no
  infinities, 0x7F/0xFF are NaN, largest finite value 448, subnormal step 2^-9.
- e8m0 (OCP e8m0fnu): an unsigned biased exponent, value 2^(byte - 127), 255 is NaN.
- e2m1 (FP4): 1 sign, 2 exponent bits, 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
  Packed two per byte: element 2j is the low nibble, element 2j+1 the high nibble.
- bf16: the top 16 bits of a float32, rounded to nearest even.
Encoders round to nearest, ties to the even code, and saturate at the largest finite value.
"""
from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = man * 2.0 ** -9
    val = sign * np.where(exp == 0, subnormal, normal)
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


def _e2m1_table() -> np.ndarray:
    mags = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
    return np.concatenate([mags, -mags]).astype(np.float32)


# Read-only lookup tables (code -> float32 value).
E4M3_VALUES = _e4m3_table()
E4M3_VALUES.setflags(write=False)
E2M1_VALUES = _e2m1_table()
E2M1_VALUES.setflags(write=False)


def _nearest_code(mag: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest grid value to each |x|; ties go to the even index.

    `grid` is ascending, starts at 0, and index parity equals mantissa parity for
    both e4m3 and e2m1, so "even index" is the round-half-to-even rule.
    """
    mag = np.minimum(mag, grid[-1])
    hi = np.searchsorted(grid, mag, side="left").clip(0, len(grid) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo = mag - grid[lo]
    d_hi = grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo)


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3 codes -> float32 values (NaN for 0x7F / 0xFF)."""
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float -> uint8 e4m3 codes, round to nearest even, saturating at +-448; NaN -> 0x7F."""
    x = np.asarray(x, dtype=np.float64)
    grid = E4M3_VALUES[:0x7F].astype(np.float64)  # codes 0..126, ascending, all finite
    with np.errstate(invalid="ignore"):
        code = _nearest_code(np.nan_to_num(np.abs(x), nan=0.0), grid).astype(np.uint8)
    code = np.where(np.signbit(x), code | np.uint8(0x80), code).astype(np.uint8)
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)


def e8m0_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 e8m0 scale bytes -> float32 2^(b-127); byte 255 -> NaN."""
    b = np.asarray(codes, dtype=np.uint8).astype(np.int32)
    with np.errstate(over="ignore"):
        val = np.ldexp(np.float32(1.0), b - E8M0_BIAS).astype(np.float32)
    return np.where(b == E8M0_NAN, np.float32(np.nan), val).astype(np.float32)


def e8m0_encode(exponent: np.ndarray) -> np.ndarray:
    """Integer power-of-two exponents k (2^k) -> e8m0 bytes; k must lie in [-127, 127]."""
    k = np.asarray(exponent, dtype=np.int64)
    if k.size and (k.min() < -E8M0_BIAS or k.max() > 254 - E8M0_BIAS):
        raise ValueError("e8m0 exponent out of range [-127, 127]")
    return (k + E8M0_BIAS).astype(np.uint8)


def e2m1_decode(nibbles: np.ndarray) -> np.ndarray:
    """4-bit e2m1 codes (0..15, in any integer array) -> float32 values."""
    return E2M1_VALUES[np.asarray(nibbles, dtype=np.uint8) & 0xF]


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """float -> 4-bit e2m1 codes (uint8 0..15), round to nearest even, saturating at +-6."""
    x = np.asarray(x, dtype=np.float64)
    grid = E2M1_VALUES[:8].astype(np.float64)
    code = _nearest_code(np.abs(x), grid).astype(np.uint8)
    return np.where(np.signbit(x), code | np.uint8(8), code).astype(np.uint8)


def fp4_pack(nibbles: np.ndarray) -> np.ndarray:
    """[..., 2n] nibbles -> [..., n] bytes; element 2j in the low nibble, 2j+1 in the high."""
    n = np.asarray(nibbles, dtype=np.uint8)
    if n.shape[-1] % 2:
        raise ValueError("fp4_pack needs an even number of elements in the last dimension")
    return ((n[..., 0::2] & 0xF) | ((n[..., 1::2] & 0xF) << 4)).astype(np.uint8)


def fp4_unpack(packed: np.ndarray) -> np.ndarray:
    """[..., n] bytes (uint8 or int8) -> [..., 2n] nibbles, inverse of fp4_pack."""
    b = np.asarray(packed).view(np.uint8)
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = b & 0xF
    out[..., 1::2] = b >> 4
    return out


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); returns float32."""
    f = np.array(x, dtype=np.float32, order="C", copy=True)
    u = f.view(np.uint32)
    nan = np.isnan(f)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    u &= np.uint32(0xFFFF0000)
    if nan.any():
        f[nan] = np.nan
    return f


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, round to nearest even; NaN stays a quiet NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), out).astype(np.uint16)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    u = np.asarray(u16, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return u.view(np.float32)
