"""Mixture of experts: the router (selection) and the call into the expert math.

Score-routed layers pick the top-k of sqrt(softplus(x Wg^T)) + bias (bias for selection
only); hash layers take the experts of the token id from tid2eid. Routing weights are the
unbiased scores of the chosen experts, renormalised to sum 1, times route_scale.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .nn import F32, sigmoid, softmax, softplus, topk_desc
from .numerics import Numerics
from .params import MoEW


def scores_of(score_func: str, logits: np.ndarray) -> np.ndarray:
    if score_func == "softmax":
        return softmax(logits)
    if score_func == "sigmoid":
        return sigmoid(logits)
    return np.sqrt(softplus(logits)).astype(F32)


def select_experts(logits: np.ndarray, bias: np.ndarray | None, hash_idx: np.ndarray | None, k: int,
                   score_func: str, route_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [S, E] -> (expert ids [S, k], weights [S, k] float32): ids from
    `hash_idx` [S, k] when given, else the top-k of scores + bias (ties: lower id first)."""
    sc = scores_of(score_func, logits)                                     # [S, E] fp32
    if hash_idx is not None:
        idx = np.asarray(hash_idx, dtype=np.int64)                         # [S, k]
    else:
        idx = topk_desc(sc if bias is None else sc + bias, k)              # [S, k]
    wts = np.take_along_axis(sc, idx, axis=1)                              # [S, k]
    if score_func != "softmax":
        wts = (wts / wts.astype(np.float64).sum(axis=1, keepdims=True)).astype(F32)
    return idx, (wts * F32(route_scale)).astype(F32)


def route(cfg: ModelConfig, w: MoEW, x: np.ndarray, ids: np.ndarray, be):
    """x [S, d], token ids [S] -> (expert ids [S, k], weights [S, k] float32)."""
    logits = be.dense(x, w.gate)                                           # [S, E] fp32
    hash_idx = None if w.tid2eid is None else w.tid2eid[ids]               # [S, k]
    return be.route(logits, w.bias, hash_idx, cfg.n_activated_experts, cfg.score_func, cfg.route_scale)


def moe(cfg: ModelConfig, w: MoEW, x: np.ndarray, ids: np.ndarray, num: Numerics, be) -> np.ndarray:
    """x [S, d] (bf16 values after ffn_norm) -> [S, d]."""
    idx, wts = route(cfg, w, x, ids, be)
    shared_limit = cfg.swiglu_limit if num.shared_clamp else 0.0
    return be.bf16(be.moe_experts(x, idx, wts, w, cfg.swiglu_limit, shared_limit))
