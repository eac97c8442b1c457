"""Numeric mode of a run: the model's own rounding steps, or exact float math.

Default mode reproduces every rounding the official model applies (bf16 activations, the
FP8/FP4 round trips, FP8 activation quantization before FP8/FP4 linears). Exact-math mode
turns all of them off, keeps every cache in float32 and uses exactly dequantized weights:
two correct implementations then agree to float32 noise, which makes the math comparable
across implementations (random-weight models are chaotic under the rounding steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv4.quant.blocks import q4, q8
from dsv4.quant.formats import bf16_round

from .errors import DsvError


@dataclass(frozen=True)
class Numerics:
    exact: bool = False
    kv_fp8_sim: bool = True     # current revision: cached KV nope dims really round to e4m3
    shared_clamp: bool = True   # current revision: the shared expert is clamped by swiglu_limit

    @classmethod
    def from_revision(cls, revision: str = "current", exact: bool = False) -> "Numerics":
        """`current` (the official behaviour now) or `initial` (the first HF revision)."""
        if revision not in ("current", "initial"):
            raise DsvError(f"--revision must be 'current' or 'initial', got '{revision}'")
        new = revision == "current"
        return cls(exact=exact, kv_fp8_sim=new, shared_clamp=new)

    # -- the rounding points; identity in exact mode
    def bf16(self, x: np.ndarray) -> np.ndarray:
        return x if self.exact else bf16_round(x)

    def kv_fp8(self, x: np.ndarray, block: int) -> np.ndarray:
        return x if (self.exact or not self.kv_fp8_sim) else q8(x, block)

    def fp4(self, x: np.ndarray, block: int) -> np.ndarray:
        return x if self.exact else q4(x, block)

    @property
    def quantize_activations(self) -> bool:
        return not self.exact

    @property
    def kv_storage(self) -> str:
        """How caches store KV: 'f32' (exact), 'fp8' (codes + exponents), 'bf16'."""
        if self.exact:
            return "f32"
        return "fp8" if self.kv_fp8_sim else "bf16"

    def describe(self) -> str:
        if self.exact:
            return "exact float32 math (rounding steps off)"
        rev = "current" if (self.kv_fp8_sim and self.shared_clamp) else "custom"
        if not self.kv_fp8_sim and not self.shared_clamp:
            rev = "initial"
        return f"model rounding ({rev} revision)"
