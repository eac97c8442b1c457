"""Small reference operations shared by the forward pass (NumPy, float32 in and out).

Reductions run in float64 and are rounded to float32 once, so a row gives the same
float32 result whether it is computed alone (decode) or inside a batch (prefill).
"""
from __future__ import annotations

import functools

import numpy as np

F32 = np.float32


def rms_scale(x: np.ndarray, eps: float) -> np.ndarray:
    """1/sqrt(mean(x^2) + eps) over the last axis, float32 [..., 1]."""
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True).astype(F32)
    return (1.0 / np.sqrt(ms.astype(np.float64) + F32(eps))).astype(F32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / rms(x); the caller rounds the result to bf16 where the model does."""
    return (weight.astype(F32) * (x * rms_scale(x, eps))).astype(F32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def silu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / (1.0 + np.exp(-x64))).astype(F32)


def softplus(x: np.ndarray, threshold: float = 20.0) -> np.ndarray:
    """log(1 + e^x), returning x itself above the threshold (as PyTorch does)."""
    x64 = x.astype(np.float64)
    return np.where(x64 > threshold, x64, np.log1p(np.exp(np.minimum(x64, threshold)))).astype(F32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - np.max(x64, axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(F32)


def matmul_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [..., K] @ w[O, K]^T accumulated in float64, returned as float32."""
    return np.matmul(x.astype(np.float64), w.astype(np.float64).T).astype(F32)


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (a power of two), natural order, float64
    (read-only, built once per order)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def hadamard_rotate(x: np.ndarray) -> np.ndarray:
    """(x @ H_n) / sqrt(n) along the last axis (n = x.shape[-1])."""
    n = x.shape[-1]
    return (x.astype(np.float64) @ (hadamard_matrix(n) * n ** -0.5)).astype(F32)


def topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis; ties go to the lower index."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]
