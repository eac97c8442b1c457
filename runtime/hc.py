"""Manifold-constrained hyper-connections: hc copies of the residual stream per token.

hc_pre mixes the copies into the sublayer input and returns the `post` weights and the
Sinkhorn-normalised combination matrix; hc_post writes the sublayer output back into every
copy, copy k gathering column k of the matrix; hc_head is the final mix before the norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .nn import F32, rms_scale, sigmoid
from .numerics import Numerics


@dataclass(frozen=True)
class HcParams:
    fn: np.ndarray      # f32 [mix, hc*d]
    base: np.ndarray    # f32 [mix]
    scale: np.ndarray   # f32 [3] (or [1] for hc_head)


def _mixes(X: np.ndarray, p: HcParams, eps: float, be) -> np.ndarray:
    """(fn . flatten(X)) * rms^-1 for X [S, hc, d] -> [S, mix]."""
    z = X.reshape(X.shape[0], -1)                       # [S, hc*d], copy-major
    return (be.dense(z, p.fn) * rms_scale(z, eps)).astype(F32)


def sinkhorn(c: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """Row softmax + eps, then alternate column / row normalisation; c [S, hc, hc]."""
    c64 = c.astype(np.float64)
    e = np.exp(c64 - c64.max(axis=-1, keepdims=True))
    c32 = (e / e.sum(axis=-1, keepdims=True)).astype(F32) + F32(eps)
    c32 = (c32 / (c32.sum(axis=-2, keepdims=True) + F32(eps))).astype(F32)
    for _ in range(iters - 1):
        c32 = (c32 / (c32.sum(axis=-1, keepdims=True) + F32(eps))).astype(F32)
        c32 = (c32 / (c32.sum(axis=-2, keepdims=True) + F32(eps))).astype(F32)
    return c32


def hc_pre(X: np.ndarray, p: HcParams, hc: int, iters: int, hc_eps: float, norm_eps: float,
           num: Numerics, be) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X [S, hc, d] -> (x [S, d], post [S, hc], comb [S, hc, hc])."""
    mix = _mixes(X, p, norm_eps, be)                                             # [S, mix]
    pre = sigmoid(mix[:, :hc] * p.scale[0] + p.base[:hc]) + F32(hc_eps)         # [S, hc]
    post = F32(2) * sigmoid(mix[:, hc:2 * hc] * p.scale[1] + p.base[hc:2 * hc])  # [S, hc]
    comb = (mix[:, 2 * hc:].reshape(-1, hc, hc) * p.scale[2]
            + p.base[2 * hc:].reshape(hc, hc)).astype(F32)                      # [S, hc, hc]
    comb = sinkhorn(comb, iters, hc_eps)
    x = np.einsum("sh,shd->sd", pre.astype(np.float64), X.astype(np.float64)).astype(F32)
    return num.bf16(x), post, comb


def hc_post(a: np.ndarray, X: np.ndarray, post: np.ndarray, comb: np.ndarray,
            num: Numerics) -> np.ndarray:
    """a [S, d], X [S, hc, d] -> X' [S, hc, d] with X'_k = post_k a + sum_j comb[j, k] X_j."""
    mixed = np.einsum("sjk,sjd->skd", comb.astype(np.float64), X.astype(np.float64))
    y = post[:, :, None].astype(np.float64) * a[:, None, :].astype(np.float64) + mixed
    return num.bf16(y.astype(F32))


def hc_head(X: np.ndarray, p: HcParams, hc_eps: float, norm_eps: float,
            num: Numerics, be) -> np.ndarray:
    """Final mix of the hc copies: X [S, hc, d] -> [S, d]."""
    mix = _mixes(X, p, norm_eps, be)                                              # [S, hc]
    w = sigmoid(mix * p.scale[0] + p.base) + F32(hc_eps)                      # [S, hc]
    y = np.einsum("sh,shd->sd", w.astype(np.float64), X.astype(np.float64)).astype(F32)
    return num.bf16(y)
