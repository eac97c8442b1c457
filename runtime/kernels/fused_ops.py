"""The small operations of the fast backend: fused Numba kernels (glue.py) with the
signatures of RefBackend's. A mixin: FastBackend combines it with the matrix kernels.

The model code always replaces an array by the result of these operations, so they may
work in the input's buffer when it is a writable float32 C array (`own`).
"""
from __future__ import annotations

import numpy as np

from . import glue
from .actq import act_quant_values

F32 = np.float32
PARALLEL_ELEMS = 1 << 16          # elementwise work below this runs on one thread


def own(x: np.ndarray) -> np.ndarray:
    """x itself when it is a writable float32 C array (to be overwritten), else a copy."""
    if x.dtype == F32 and x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.array(x, dtype=F32, order="C")


class FusedOps:
    """Needs `self.num` (Numerics) and `self.dense` (for the hyper-connection mixes)."""

    @property
    def _rnd(self) -> bool:
        return not self.num.exact

    def bf16(self, x):
        if self.num.exact:
            return x
        x = own(x)
        flat = x.reshape(-1)
        (glue.bf16_inplace_parallel if flat.size >= PARALLEL_ELEMS else glue.bf16_inplace)(flat)
        return x

    def hc_pre(self, X, p, hc_mult, iters, hc_eps, norm_eps):
        S = X.shape[0]
        X = np.ascontiguousarray(X, dtype=F32)
        mix = np.ascontiguousarray(self.dense(X.reshape(S, -1), p.fn))
        x = np.empty((S, X.shape[2]), F32)
        post = np.empty((S, hc_mult), F32)
        comb = np.empty((S, hc_mult, hc_mult), F32)
        glue.hc_pre_rows(X, mix, p.base, p.scale, iters, hc_eps, norm_eps, self._rnd, x, post, comb)
        return x, post, comb

    def hc_post(self, a, X, post, comb):
        out = np.empty(X.shape, F32)
        fn = glue.hc_post_rows if X.shape[0] > 1 else glue.hc_post_rows_serial
        fn(np.ascontiguousarray(a, dtype=F32), np.ascontiguousarray(X, dtype=F32), post, comb, self._rnd, out)
        return out

    def hc_head(self, X, p, hc_eps, norm_eps):
        S = X.shape[0]
        X = np.ascontiguousarray(X, dtype=F32)
        mix = np.ascontiguousarray(self.dense(X.reshape(S, -1), p.fn))
        out = np.empty((S, X.shape[2]), F32)
        glue.hc_head_rows(X, mix, p.base, p.scale, hc_eps, norm_eps, self._rnd, out)
        return out

    def rmsnorm(self, x, weight, eps, round_input=False):
        x2 = np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])
        out = np.empty_like(x2)
        glue.rmsnorm_rows(x2, np.ascontiguousarray(weight, dtype=F32), eps,
                          self._rnd and round_input, self._rnd, out)
        return out.reshape(x.shape)

    def head_norm(self, q, eps):
        out = own(q)
        glue.head_norm_rows(out, eps, self._rnd)
        return out

    def rope(self, x, positions, rope, inverse=False):
        out = own(x)
        glue.rope_rows(out.reshape(x.shape[0], -1, x.shape[-1]), np.asarray(positions, np.int64),
                       rope.freqs, inverse, self._rnd)
        return out

    def hadamard(self, x):
        out = own(x)
        glue.hadamard_rows(out.reshape(-1, x.shape[-1]), self._rnd)
        return out

    def kv_fp8(self, x, block):
        if self.num.exact or not self.num.kv_fp8_sim:
            return x
        return act_quant_values(x, block)

    def fp4(self, x, block):
        if self.num.exact:
            return x
        out = own(x)
        glue.q4_rows(out.reshape(-1, x.shape[-1]), block)
        return out

