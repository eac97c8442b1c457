"""Linear weights as stored on disk (zero-copy views), and their exact dequantization.

A `LinearW` keeps the raw view plus its format: 'fp8' (e4m3 + e8m0 tile scales), 'fp4'
(packed e2m1 + e8m0 per 32 inputs) or 'float' (bf16 / f32). Model code never converts
weights at load; the reference path dequantizes at use and the fast kernels read the raw
layout directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv4.quant.blocks import dequant_fp4_weight, dequant_fp8_weight
from dsv4.quant.formats import bf16_to_f32

from .config import FP4_BLOCK


@dataclass(frozen=True)
class LinearW:
    name: str
    fmt: str                     # 'fp8' | 'fp4' | 'float'
    weight: np.ndarray           # uint8 [O,K] | int8 [O,K/2] | uint16 (bf16) / f32 [O,K]
    scale: np.ndarray | None     # uint8 e8m0 tiles (fp8) or per-32 groups (fp4)
    out_features: int
    in_features: int
    block: tuple[int, int] = (128, 128)

    @property
    def quantized(self) -> bool:
        """FP8/FP4 weights: the model quantizes the input activation to e4m3 first."""
        return self.fmt in ("fp8", "fp4")

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def dequant(self, rows: slice | None = None) -> np.ndarray:
        """float32 [O, K] (or a row range), exact."""
        rows = rows or slice(None)
        if self.fmt == "fp8":
            b0 = self.block[0]
            start, stop, _ = rows.indices(self.out_features)
            if start % b0:
                raise ValueError("fp8 row slices must start on a tile boundary")
            return dequant_fp8_weight(self.weight[rows].view(np.uint8),
                                      self.scale[start // b0:-(-stop // b0)], self.block)
        if self.fmt == "fp4":
            return dequant_fp4_weight(self.weight[rows], self.scale[rows], FP4_BLOCK)
        return as_f32(self.weight[rows])


def as_f32(a: np.ndarray) -> np.ndarray:
    """A float tensor view (bf16 as uint16, or f32) as float32 values."""
    if a.dtype == np.uint16:
        return bf16_to_f32(a)
    return np.asarray(a, dtype=np.float32)
