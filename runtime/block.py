"""One transformer block: hyper-connection mix, attention, hyper-connection mix, MoE."""
from __future__ import annotations

import numpy as np

from .attention.attention import attention
from .config import ModelConfig
from .kv_cache import LayerCache
from .moe import moe
from .numerics import Numerics
from .params import BlockW
from .rope import Rope


def block_forward(cfg: ModelConfig, w: BlockW, X: np.ndarray, ids: np.ndarray, p0: int,
                  lc: LayerCache, rope: Rope, num: Numerics, be) -> np.ndarray:
    """X [S, hc, d] residual copies -> X' [S, hc, d]; advances the layer cache."""
    hc = (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
    x, post, comb = be.hc_pre(X, w.hc_attn, *hc)                           # [S, d]
    x = be.rmsnorm(x, w.attn_norm, cfg.norm_eps)
    a = attention(cfg, w.layer, w.attn, x, p0, lc, rope, be)       # [S, d]
    X = be.hc_post(a, X, post, comb)                                       # [S, hc, d]

    x, post, comb = be.hc_pre(X, w.hc_ffn, *hc)
    x = be.rmsnorm(x, w.ffn_norm, cfg.norm_eps)
    f = moe(cfg, w.ffn, x, ids, num, be)                                   # [S, d]
    return be.hc_post(f, X, post, comb)
