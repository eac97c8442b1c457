"""The seam between model code and arithmetic: the heavy operations of the forward pass.

`RefBackend` is the readable NumPy reference of every operation. A fast backend provides
the same methods with the same signatures (runtime/kernels/) and is tested against it,
operation by operation and end to end. Selection logic (router, indexer top-k, window and
visibility rules) lives in the model code; the backend only does the math it is given.
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.blocks import act_quant_values

from . import hc
from .attention.attention import attend
from .block import block_forward
from .linear import LinearW, as_f32
from .nn import F32, hadamard_rotate, matmul_t, rms_scale, rmsnorm, silu
from .numerics import Numerics
from .params import ExpertW, MoEW
from .rope import Rope

ROW_CHUNK = 8192          # rows of a weight dequantized at a time (bounds memory)
QUERY_CHUNK = 64          # queries per block in the reference attention


class RefBackend:
    name = "ref"

    def __init__(self, num: Numerics):
        self.num = num

    # ------------------------------------------------------------ small operations
    # Each returns float32 values rounded to bf16 where the model rounds (default mode).
    def bf16(self, x):
        """Round to bf16 (identity in exact mode); may round a fresh array in place."""
        return self.num.bf16(x)

    def hc_pre(self, X, p: hc.HcParams, hc_mult: int, iters: int, hc_eps: float, norm_eps: float):
        """Hyper-connection input mix: X [S, hc, d] -> (x [S, d], post [S, hc], comb)."""
        return hc.hc_pre(X, p, hc_mult, iters, hc_eps, norm_eps, self.num, self)

    def hc_post(self, a, X, post, comb):
        """Write a sublayer output back into the hc copies -> X' [S, hc, d]."""
        return hc.hc_post(a, X, post, comb, self.num)

    def hc_head(self, X, p: hc.HcParams, hc_eps: float, norm_eps: float):
        return hc.hc_head(X, p, hc_eps, norm_eps, self.num, self)

    def rmsnorm(self, x, weight, eps: float, round_input: bool = False):
        """RMSNorm of the last axis; `round_input` rounds x to bf16 first (a bf16 linear
        output feeding the norm)."""
        num = self.num
        return num.bf16(rmsnorm(num.bf16(x) if round_input else x, weight, eps))

    def head_norm(self, q, eps: float):
        """q [S, H, D] divided by each head's rms (no weight)."""
        return self.num.bf16(q * rms_scale(q, eps))

    def rope(self, x, positions, rope: Rope, inverse: bool = False):
        """Rotate the last rope dims of x [S, ..., D] at `positions`; all dims rounded."""
        return self.num.bf16(rope.apply(x, positions, inverse))

    def hadamard(self, x):
        return self.num.bf16(hadamard_rotate(x))

    def kv_fp8(self, x, block: int):
        """FP8 round trip of cached KV nope dims (identity in exact mode / initial revision)."""
        return self.num.kv_fp8(x, block)

    def fp4(self, x, block: int):
        """FP4 round trip of indexer queries and keys (identity in exact mode)."""
        return self.num.fp4(x, block)

    # ------------------------------------------------------------ linears
    def linear(self, x: np.ndarray, w: LinearW, quantize_input: bool = True) -> np.ndarray:
        """x [S, K] -> x W^T [S, O] float32 (not rounded). FP8/FP4 weights quantize the
        input to e4m3 per block first, unless exact mode or `quantize_input` is off."""
        if w.quantized and quantize_input and self.num.quantize_activations:
            x = act_quant_values(x, w.block[1])
        if w.out_features <= ROW_CHUNK:
            return matmul_t(x, w.dequant())
        step = ROW_CHUNK - ROW_CHUNK % w.block[0]
        return np.concatenate([matmul_t(x, w.dequant(slice(r, r + step)))
                               for r in range(0, w.out_features, step)], axis=-1)

    def project(self, x: np.ndarray, weights: list) -> list:
        """x times each weight (a LinearW: FP8/FP4 quantize x first; or a raw bf16/f32
        matrix) -> list of float32 [S, O]. One call so a fast backend can batch them."""
        return [self.linear(x, w) if isinstance(w, LinearW) else self.dense(x, w) for w in weights]

    def grouped_linear(self, x: np.ndarray, w: LinearW) -> np.ndarray:
        """x [S, G, K] with w [G*L, K] seen as G blocks of L rows -> [S, G, L] float32.
        Used for wo_a: weights taken exactly (bf16 values), input not quantized."""
        S, G, _ = x.shape
        wg = w.dequant().reshape(G, w.out_features // G, -1)               # [G, L, K]
        return np.stack([matmul_t(x[:, g], wg[g]) for g in range(G)], axis=1)

    def dense(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x [S, K] @ w[O, K]^T for a bf16/f32 tensor view (router, head, projections)."""
        out = [matmul_t(x, as_f32(w[r:r + ROW_CHUNK])) for r in range(0, w.shape[0], ROW_CHUNK)]
        return np.concatenate(out, axis=-1) if len(out) > 1 else out[0]

    # ------------------------------------------------------------ blocks
    def block(self, cfg, w, X: np.ndarray, ids: np.ndarray, p0: int, lc, rope: Rope) -> np.ndarray:
        """One transformer block (block.block_forward): X [S, hc, d] -> X' [S, hc, d]."""
        return block_forward(cfg, w, X, ids, p0, lc, rope, self.num, self)

    # ------------------------------------------------------------ attention
    def attend(self, cfg, layer: int, w, lc, p0: int, qs: list, proj: list, rope: Rope) -> np.ndarray:
        """Attention of one layer between its matmuls (attention.attend: projections in,
        o [S, H, D] out, the layer cache advanced)."""
        return attend(cfg, layer, w, lc, p0, qs, proj, rope, self)

    def sparse_attn(self, q: np.ndarray, kv: np.ndarray, idx: np.ndarray, sink: np.ndarray,
                    scale: float) -> np.ndarray:
        """q [S, H, D], kv [T, D] (keys = values), idx [S, K] rows of kv (-1 = none),
        sink [H] -> o [S, H, D] float32, with exp(sink) added to each denominator."""
        S, H, D = q.shape
        out = np.empty((S, H, D), F32)
        for s0 in range(0, S, QUERY_CHUNK):
            ix = idx[s0:s0 + QUERY_CHUNK]                                 # [s, K]
            keys = kv[np.maximum(ix, 0)].astype(np.float64)                # [s, K, D]
            sc = np.einsum("shd,skd->shk", q[s0:s0 + QUERY_CHUNK].astype(np.float64), keys)
            sc = (sc.astype(F32) * F32(scale)).astype(np.float64)
            sc = np.where(ix[:, None, :] >= 0, sc, -np.inf)                 # [s, H, K]
            mx = np.maximum(sc.max(axis=-1, keepdims=True), -1e300)
            e = np.exp(sc - mx)
            z = e.sum(axis=-1, keepdims=True) + np.exp(sink[None, :, None].astype(np.float64) - mx)
            out[s0:s0 + QUERY_CHUNK] = np.einsum("shk,skd->shd", e / z, keys).astype(F32)
        return out

    def read_kv(self, store, rows: np.ndarray) -> np.ndarray:
        """Cached vectors at `rows` of a KV store, decoded to float32 [n, D]."""
        return store.read(rows)

    def write_kv(self, store, rows, x: np.ndarray) -> None:
        """Store vectors x [n, D] at `rows` (int array or slice) of a KV store, in its format."""
        store.write(rows, x)

    def index_scores(self, qi: np.ndarray, wt: np.ndarray, store, T: int) -> np.ndarray:
        """Lightning-indexer scores over the first T keys of `store`: qi [S, Ih, Id],
        wt [S, Ih] -> [S, T] = sum_h wt_h * relu(qi_h . k_t). Default mode rounds like the
        model's bf16 einsum: each dot, each weighted term and the head sum to bf16."""
        keys = store.read(slice(0, T))                                      # [T, Id]
        dots = np.einsum("shd,td->sht", qi.astype(np.float64), keys.astype(np.float64))
        dots = self.num.bf16(dots.astype(F32))
        terms = self.num.bf16((np.maximum(dots, 0) * wt[:, :, None]).astype(F32))
        return self.num.bf16(terms.astype(np.float64).sum(axis=1).astype(F32))

    def select_topk(self, scores: np.ndarray, positions: np.ndarray, ratio: int,
                    topk: int) -> np.ndarray:
        """Indexer selection (see attention.indexer.select): entry ids [S, k], -1 = none."""
        from .attention.indexer import select  # noqa: PLC0415
        return select(scores, positions, ratio, topk)

    # ------------------------------------------------------------ MoE
    def route(self, logits: np.ndarray, bias, hash_idx, k: int, score_func: str,
              route_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Router math (see moe.select_experts): logits [S, E] -> (ids [S, k], weights)."""
        from .moe import select_experts  # noqa: PLC0415 - moe.py holds the router reference
        return select_experts(logits, bias, hash_idx, k, score_func, route_scale)

    def expert(self, x: np.ndarray, w: ExpertW, limit: float,
               weight: np.ndarray | None = None) -> np.ndarray:
        """SwiGLU expert on x [n, d] (already bf16 values) -> [n, d] float32, rounded to bf16
        as the model's w2 output. `weight` [n] multiplies the activation before w2."""
        g = self.bf16(self.linear(x, w.w1))
        u = self.bf16(self.linear(x, w.w3))
        if limit > 0:
            u = np.clip(u, -limit, limit)
            g = np.minimum(g, F32(limit))
        h = silu(g) * u
        if weight is not None:
            h = h * weight[:, None]
        return self.bf16(self.linear(self.bf16(h.astype(F32)), w.w2))

    def moe_experts(self, x: np.ndarray, idx: np.ndarray, wts: np.ndarray, w: MoEW,
                    limit: float, shared_limit: float) -> np.ndarray:
        """Routed experts idx/wts [S, k] plus the shared expert -> [S, d] float32 sum."""
        y = np.zeros(x.shape, F32)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            y[rows] += self.expert(x[rows], w.experts[e], limit, wts[rows, slot])
        return (y + self.expert(x, w.shared, shared_limit)).astype(F32)

    # ------------------------------------------------------------ head
    def logits(self, y: np.ndarray, head: np.ndarray) -> np.ndarray:
        """y [S, d] -> float32 logits [S, V]."""
        return self.dense(y, head)
