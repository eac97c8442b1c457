"""Rotary position embedding on interleaved pairs, with optional YaRN frequency blending.

The rotary dims are the LAST `R` dims of a vector, taken as complex pairs (v[2i], v[2i+1]).
Frequencies f_i = theta^(-2i/R) in float32; with YaRN, pairs below the `beta_fast` correction
dim keep f_i, pairs above the `beta_slow` one use f_i / factor, with a linear ramp between.
The angle for position p is the float32 product fp32(p) * f_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass(frozen=True)
class Rope:
    freqs: np.ndarray   # float32 [R/2]

    @classmethod
    def for_layer(cls, cfg: ModelConfig, layer: int) -> "Rope":
        """Compressed layers: compress_rope_theta with YaRN; window-only layers: rope_theta."""
        if cfg.ratio(layer) > 0:
            return cls(yarn_freqs(cfg.rope_dim, cfg.compress_rope_theta, cfg.original_seq_len,
                                  cfg.rope_factor, cfg.beta_fast, cfg.beta_slow))
        return cls(yarn_freqs(cfg.rope_dim, cfg.rope_theta, 0, 1.0, 0.0, 0.0))

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the angles, float32 [len(positions), R/2]."""
        ang = np.asarray(positions, dtype=np.float32)[:, None] * self.freqs[None, :]
        ang64 = ang.astype(np.float64)
        return np.cos(ang64).astype(np.float32), np.sin(ang64).astype(np.float32)

    def apply(self, x: np.ndarray, positions: np.ndarray, inverse: bool = False) -> np.ndarray:
        """Rotate the last R dims of x [S, ..., D] by the angles of `positions` [S].

        Returns a new float32 array; the caller rounds to bf16 where the model does.
        """
        r = 2 * self.freqs.shape[0]
        cos, sin = self.cos_sin(positions)
        if inverse:
            sin = -sin
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (r // 2,)
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        out = np.array(x, dtype=np.float32, copy=True)
        a = x[..., -r::2].astype(np.float32)
        b = x[..., -r + 1::2].astype(np.float32)
        out[..., -r::2] = a * cos - b * sin
        out[..., -r + 1::2] = a * sin + b * cos
        return out


def yarn_freqs(dim: int, theta: float, original_len: int, factor: float,
               beta_fast: float, beta_slow: float) -> np.ndarray:
    """Per-pair rotary frequencies (float32 [dim/2]); YaRN when original_len > 0."""
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
             ).astype(np.float32)
    if original_len <= 0:
        return freqs

    def corr_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo),
                   0, 1).astype(np.float32)
    smooth = np.float32(1) - ramp
    return (freqs / np.float32(factor) * (np.float32(1) - smooth) + freqs * smooth).astype(np.float32)
