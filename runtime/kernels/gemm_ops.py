"""The prefill bf16 GEMM side of the fast backend (gemm.py): which calls it takes.

A mixin that FastBackend combines with the matrix kernels (it uses the backend's `num`,
`bf16_gemm`, `_gemm_fits` and `_gemm_checked`). A call takes the GEMM when the kernel
variant is avx512, the rounding steps are on (the input was e4m3-quantized, so it packs
exactly as bf16), and every weight is MXFP4 or FP8 with scales that keep the decoded
weights normal bf16 numbers; otherwise the caller's dequantize + sgemm path runs.
"""
from __future__ import annotations

import logging

import numpy as np

from ..linear import LinearW
from ..nn import F32
from . import attn, gemm, selfcheck
from .weight_index import weight_key

log = logging.getLogger(__name__)


class GemmOps:
    def _pack(self, x2: np.ndarray) -> gemm.PackedX | None:
        """x2 packed for the bf16 GEMM, or None (off, or x2 not exact in bf16). The GEMM is
        checked against the reference on first use and switched off if it is wrong."""
        if not (self.bf16_gemm and self.num.quantize_activations):
            return None
        if not self._gemm_checked:
            self._gemm_checked = True
            problem = selfcheck.check_gemm()
            if problem is not None:
                log.warning("bf16 prefill GEMM disabled: %s", problem)
                self.bf16_gemm = False
                return None
        return gemm.PackedX.pack(x2)

    def _fits(self, w) -> bool:
        """The bf16 GEMM takes this weight (format, scale range); checked once per weight."""
        key = weight_key(w)
        if key not in self._gemm_fits:
            self._gemm_fits[key] = (isinstance(w, LinearW) and
                                    gemm.fits(w.fmt, w.in_features, w.scale, w.block))
        return self._gemm_fits[key]

    def _gemm_rows(self, px: gemm.PackedX | None, weights, check: bool = True,
                   out: np.ndarray | None = None) -> np.ndarray | None:
        """x times each weight, side by side: float32 [M, sum O] (64-byte aligned, or into
        `out`), or None when a weight is not MXFP4 / FP8 or its scales leave bf16's normal
        range."""
        if px is None or (check and not all(self._fits(w) for w in weights)):
            return None
        if out is None:
            out = attn.aligned_empty((px.M, sum(w.out_features for w in weights)))
        c = 0
        for w in weights:
            gemm.gemm_into(px, w.fmt, w.weight, w.scale, out[:, c:c + w.out_features], w.block)
            c += w.out_features
        return out

    def _grouped_gemm(self, x, w: LinearW, L: int):
        """The bf16 GEMM per group (x[:, g] times rows g*L .. of w), or None where it does
        not apply (as _gemm_rows; FP8 groups must also start on a scale band)."""
        S, G, _ = x.shape
        b0 = w.block[0] if w.fmt == "fp8" else 1
        if L % b0 or not self._fits(w):
            return None
        out = np.empty((S, G, L), F32)
        for g in range(G):
            px = self._pack(x[:, g])
            if px is None:
                return None
            part = LinearW(w.name, w.fmt, w.weight[g * L:(g + 1) * L],
                           w.scale[g * L // b0:(g + 1) * L // b0], L, w.in_features, w.block)
            self._gemm_rows(px, [part], check=False, out=out[:, g])
        return out
