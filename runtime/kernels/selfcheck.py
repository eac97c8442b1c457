"""Numerical self-check of a kernel variant against the NumPy reference (cpu.select calls it).

Small odd shapes exercise every path once: fp4 with an odd group count, fp8 with partial
row bands and tiles, bf16/f32 with vector tails; x both bf16-exact and arbitrary.
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.blocks import dequant_fp4_weight, dequant_fp8_weight
from dsv4.quant.formats import bf16_to_f32

TOL = 1e-5


def problem(fmt: str, rng: np.random.Generator, O: int, K: int, block=(128, 128)):
    """Random (W, S, W_real float64) for a format, scales in a realistic range."""
    if fmt == "fp4":
        W = rng.integers(0, 256, (O, K // 2), dtype=np.uint8)
        S = rng.integers(118, 136, (O, K // 32), dtype=np.uint8)
        return W, S, dequant_fp4_weight(W, S).astype(np.float64)
    if fmt == "fp8":
        W = rng.integers(0, 256, (O, K), dtype=np.uint8)
        W[(W & 0x7F) == 0x7F] = 0x3F                  # no NaN codes
        S = rng.integers(118, 136, (-(-O // block[0]), -(-K // block[1])), dtype=np.uint8)
        return W, S, dequant_fp8_weight(W, S, block).astype(np.float64)
    if fmt == "bf16":
        W = (rng.standard_normal((O, K)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return W, None, bf16_to_f32(W).astype(np.float64)
    W = rng.standard_normal((O, K)).astype(np.float32)
    return W, None, W.astype(np.float64)


def worst(y: np.ndarray, Wr: np.ndarray, x: np.ndarray) -> float:
    """max_o |y - ref| / (|W| @ |x|) (0 where the bound is 0 and y is exact)."""
    x64 = np.asarray(x, np.float64)
    err = np.abs(np.asarray(y, np.float64) - Wr @ x64)
    bound = np.abs(Wr) @ np.abs(x64)
    rel = np.where(bound > 0, err / np.where(bound > 0, bound, 1), np.where(err > 0, np.inf, 0.0))
    return float(np.max(rel, initial=0.0))


def check(variant: str) -> str | None:
    from .gemv import Kernels  # noqa: PLC0415
    k = Kernels(variant)
    rng = np.random.default_rng(7)
    cases = [("fp4", 13, 352, (128, 128)), ("fp8", 131, 200, (128, 128)), ("bf16", 5, 37, None), ("f32", 5, 37, None)]
    for fmt, O, K, block in cases:
        W, S, Wr = problem(fmt, rng, O, K, block or (128, 128))
        ints = rng.integers(-15, 16, K)
        xs = (rng.standard_normal(K),                        # any float32: float / 3-plane bf16 paths
              np.ldexp(ints, -3),                             # e4m3-like, 2 digits per block
              np.ldexp(ints, rng.integers(-10, 11, K)))       # wide range: 3-digit blocks
        for x in (v.astype(np.float32) for v in xs):
            xp = k.prepare_x(fmt, x, (block or (128, 128))[1])
            y = k.gemv(fmt, W, S, xp, block or (128, 128))
            e = worst(y, Wr, x)
            if not e <= TOL:
                return f"{fmt} O={O} K={K}: error {e:.2e} of |W||x| > {TOL}"
    return None


def check_gemm() -> str | None:
    """The prefill bf16 GEMM (gemm.py) on small odd problems of both formats; None if right."""
    from . import gemm  # noqa: PLC0415
    rng = np.random.default_rng(8)
    for fmt, M, O, K in (("fp4", 19, 13, 96), ("fp8", 7, 11, 128)):
        W, S, Wr = problem(fmt, rng, O, K)
        x = np.ldexp(rng.integers(-15, 16, (M, K)), rng.integers(-10, 11, (M, K))).astype(np.float32)
        px = gemm.PackedX.pack(x)
        if px is None:
            return "bf16-exact x rejected by the packing step"
        out = np.empty((M, O), np.float32)
        gemm.gemm_into(px, fmt, W, S, out)
        e = max(worst(out[m], Wr, x[m]) for m in range(M))
        if not e <= TOL:
            return f"gemm {fmt} M={M} O={O} K={K}: error {e:.2e} of |W||x| > {TOL}"
    return None
