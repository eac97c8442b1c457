"""Block-scaled quantization: weight dequantization and the model's own rounding steps.

Scales are powers of two (ue8m0). For a block with largest magnitude `a` and format
maximum `M`, the scale exponent is `ceil(log2(fp32(a) * fp32(1/M)))`, computed exactly.
- weights: FP8 e4m3 with one scale per 128x128 tile; MXFP4 (e2m1) with one scale per 32
  consecutive inputs of a row;
- `q8` / `q4`: in-place round trips the model applies to cached KV (FP8, blocks of 64)
  and to indexer queries/keys (FP4, blocks of 32);
- `act_quant`: e4m3 codes + per-128 scale exponents for the input of FP8/FP4 linears.
A last, shorter block is allowed when the length is not a multiple of the block size.
"""
from __future__ import annotations

import numpy as np

from .formats import (E2M1_MAX, E2M1_VALUES, E4M3_MAX, E4M3_VALUES, E8M0_BIAS,
                      e2m1_encode, e4m3_encode, e8m0_decode, fp4_pack, fp4_unpack)

FP8_AMAX_FLOOR = np.float32(1e-4)
FP4_AMAX_FLOOR = np.float32(6.0 * 2.0 ** -126)


def ceil_log2(t: np.ndarray) -> np.ndarray:
    """Exact ceil(log2(t)) for positive finite float32 values (int32)."""
    mant, exp = np.frexp(np.asarray(t, dtype=np.float32))  # t = mant * 2^exp, mant in [0.5, 1)
    return np.where(mant == np.float32(0.5), exp - 1, exp).astype(np.int32)


def pow2_scale_exponent(amax: np.ndarray, fmt_max: float, floor: np.float32) -> np.ndarray:
    """Exponent k of the power-of-two block scale 2^k for block maxima `amax`."""
    a = np.maximum(np.asarray(amax, dtype=np.float32), floor)
    return ceil_log2(a * np.float32(1.0 / fmt_max))


def _blocked(x: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """View the last dim as [nblocks, block], zero-padding a short last block."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1)
    return x.reshape(x.shape[:-1] + ((n + pad) // block, block)), n


def _unblocked(xb: np.ndarray, n: int) -> np.ndarray:
    return xb.reshape(xb.shape[:-2] + (xb.shape[-2] * xb.shape[-1],))[..., :n]


# ---------------------------------------------------------------- FP8 (e4m3) blocks
def fp8_quantize_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] -> (e4m3 codes uint8 [..., n], scale exponents int32 [..., ceil(n/block)])."""
    xb, n = _blocked(x, block)
    k = pow2_scale_exponent(np.abs(xb).max(axis=-1), E4M3_MAX, FP8_AMAX_FLOOR)
    scaled = np.ldexp(xb, -k[..., None])  # exact: division by a power of two
    codes = e4m3_encode(np.clip(scaled, -E4M3_MAX, E4M3_MAX))
    return _unblocked(codes, n), k


def fp8_dequantize_blocks(codes: np.ndarray, exps: np.ndarray, block: int) -> np.ndarray:
    """Inverse of fp8_quantize_blocks: e4m3(code) * 2^k, float32."""
    vb, n = _blocked(E4M3_VALUES[codes], block)
    return _unblocked(np.ldexp(vb, exps[..., None]).astype(np.float32), n)


def q8(x: np.ndarray, block: int = 64) -> np.ndarray:
    """FP8 round trip of the model (`act_quant(..., inplace=True)`), float32 result."""
    codes, k = fp8_quantize_blocks(x, block)
    return fp8_dequantize_blocks(codes, k, block)


def act_quant(x: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Activation quantization before FP8/FP4 linears: (e4m3 codes, per-block exponents)."""
    return fp8_quantize_blocks(x, block)


def act_quant_values(x: np.ndarray, block: int = 128) -> np.ndarray:
    """The float32 values the quantized activation stands for (codes times scales)."""
    return q8(x, block)


# ---------------------------------------------------------------- FP4 (e2m1) blocks
def fp4_quantize_blocks(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] (n even) -> (packed e2m1 bytes [..., n/2], scale exponents int32)."""
    xb, n = _blocked(x, block)
    k = pow2_scale_exponent(np.abs(xb).max(axis=-1), E2M1_MAX, FP4_AMAX_FLOOR)
    scaled = np.ldexp(xb, -k[..., None])
    nibbles = _unblocked(e2m1_encode(np.clip(scaled, -E2M1_MAX, E2M1_MAX)), n)
    return fp4_pack(nibbles), k


def fp4_dequantize_blocks(packed: np.ndarray, exps: np.ndarray, block: int = 32) -> np.ndarray:
    """Inverse of fp4_quantize_blocks, float32."""
    vb, n = _blocked(E2M1_VALUES[fp4_unpack(packed)], block)
    return _unblocked(np.ldexp(vb, exps[..., None]).astype(np.float32), n)


def q4(x: np.ndarray, block: int = 32) -> np.ndarray:
    """FP4 round trip of the model (`fp4_act_quant(..., inplace=True)`), float32 result."""
    packed, k = fp4_quantize_blocks(x, block)
    return fp4_dequantize_blocks(packed, k, block)


# ---------------------------------------------------------------- weights
def dequant_fp8_weight(w: np.ndarray, scale: np.ndarray,
                       block: int | tuple[int, int] = 128) -> np.ndarray:
    """FP8 weight [O, K] (e4m3 bytes) with e8m0 tile scales [ceil(O/b0), ceil(K/b1)] -> float32."""
    b0, b1 = (block, block) if isinstance(block, int) else block
    o, k = w.shape
    s = e8m0_decode(scale)
    s_full = np.repeat(np.repeat(s, b0, axis=0)[:o], b1, axis=1)[:, :k]
    return E4M3_VALUES[w.view(np.uint8)] * s_full


def dequant_fp4_weight(w: np.ndarray, scale: np.ndarray, block: int = 32) -> np.ndarray:
    """MXFP4 weight [O, K/2] (packed e2m1 bytes) with e8m0 scale [O, K/block] -> float32 [O, K]."""
    vals = E2M1_VALUES[fp4_unpack(w)]
    o, k = vals.shape
    s = np.repeat(e8m0_decode(scale), block, axis=1)[:, :k]
    return vals * s


def e8m0_from_exponent(k: np.ndarray) -> np.ndarray:
    """Scale exponents -> e8m0 bytes (for storing scales the way checkpoints do)."""
    return (np.asarray(k, dtype=np.int32) + E8M0_BIAS).astype(np.uint8)


def quantize_fp8_weight(w: np.ndarray, block: int | tuple[int, int] = 128):
    """float weight [O, K] -> (e4m3 codes [O, K], e8m0 tile scales [ceil(O/b0), ceil(K/b1)])."""
    b0, b1 = (block, block) if isinstance(block, int) else block
    o, k = w.shape
    po, pk = -(-o // b0) * b0, -(-k // b1) * b1
    padded = np.zeros((po, pk), np.float32)
    padded[:o, :k] = w
    tiles = padded.reshape(po // b0, b0, pk // b1, b1)
    exp = pow2_scale_exponent(np.abs(tiles).max(axis=(1, 3)), E4M3_MAX, FP8_AMAX_FLOOR)
    scaled = np.ldexp(tiles, -exp[:, None, :, None]).reshape(po, pk)[:o, :k]
    return e4m3_encode(np.clip(scaled, -E4M3_MAX, E4M3_MAX)), e8m0_from_exponent(exp)


def quantize_fp4_weight(w: np.ndarray, block: int = 32):
    """float weight [O, K] -> (packed e2m1 bytes [O, K/2], e8m0 scales [O, K/block])."""
    packed, exp = fp4_quantize_blocks(w, block)
    return packed, e8m0_from_exponent(exp)
