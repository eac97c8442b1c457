"""The fast backend: same methods and semantics as RefBackend, computed by SIMD kernels.

Decode-sized calls (a few rows) run the matrix-vector kernels of gemv.py on the weights'
on-disk formats, many matrices per parallel region; prefill-sized calls dequantize weight
rows into a float32 scratch buffer and multiply with BLAS sgemm. Attention-side work uses
attn.py. Results equal the reference's to float32 accumulation rounding; in exact mode the
two backends agree to float32 noise end to end.
"""
from __future__ import annotations

import numpy as np

from ..backend import RefBackend
from ..linear import LinearW
from ..nn import F32, silu
from ..numerics import Numerics
from ..params import MoEW
from . import attn, gemv, moe_glue
from .actq import act_quant_values
from .dequant import dequant_rows
from .fused_ops import FusedOps

GEMV_MAX_ROWS = 8                 # up to this many rows per call: gemv kernels, else sgemm
SCRATCH_BYTES = 64 << 20          # float32 weight rows dequantized per sgemm step


def _fmt_of(w) -> str:
    if isinstance(w, LinearW):
        if w.fmt in ("fp8", "fp4"):
            return w.fmt
        w = w.weight
    return "bf16" if w.dtype == np.uint16 else "f32"


def _raw(w):
    return w.weight.view(np.uint8) if isinstance(w, LinearW) and w.fmt == "fp4" else (
        w.weight if isinstance(w, LinearW) else w)


def _out_features(w) -> int:
    return w.out_features if isinstance(w, LinearW) else w.shape[0]


def _key(w) -> int:
    """Identity of a weight: its stored array (views made on the fly would differ)."""
    return id(w.weight) if isinstance(w, LinearW) else id(w)


class FastBackend(FusedOps, RefBackend):
    name = "fast"

    def __init__(self, num: Numerics):
        super().__init__(num)
        self.k = gemv.kernels()
        self.where: dict[int, tuple[str, int]] = {}    # _key(weight) -> (format, table row)
        self.tables: dict[str, gemv.MatTable] = {}
        self.groups: dict[int, int] = {}               # _key(wo_a) -> first group row
        self._scratch = np.empty(0, F32)                # reused dequantization buffer

    # ------------------------------------------------------------ set-up
    def prepare(self, model) -> None:
        """Build one address table per weight format over every matrix the model uses."""
        mats: dict[str, list] = {"fp8": [], "fp4": [], "bf16": [], "f32": []}

        def add(w):
            if _key(w) in self.where:
                return
            fmt = _fmt_of(w)
            scale = w.scale if isinstance(w, LinearW) else None
            self.where[_key(w)] = (fmt, len(mats[fmt]))
            mats[fmt].append((_raw(w), scale))

        W = model.w
        blocks = list(W.blocks) + [m.block for m in W.mtp]
        for b in blocks:
            a = b.attn
            for w in (a.wq_a, a.wq_b, a.wkv, a.wo_b, b.ffn.gate, b.hc_attn.fn, b.hc_ffn.fn):
                add(w)
            self._add_groups(a.wo_a, model.cfg.o_groups, mats)
            for c in (a.compressor, a.indexer.compressor if a.indexer else None):
                if c is not None:
                    add(c.wkv)
                    add(c.wgate)
            if a.indexer is not None:
                add(a.indexer.wq_b)
                add(a.indexer.weights_proj)
            for e in list(b.ffn.experts) + [b.ffn.shared]:
                for w in (e.w1, e.w2, e.w3):
                    add(w)
        for w in (W.head, W.hc_head.fn):
            add(w)
        block = model.cfg.weight_block
        for fmt, items in mats.items():
            if items:
                scales = [s for _, s in items] if fmt in ("fp8", "fp4") else None
                self.tables[fmt] = gemv.MatTable(fmt, [w for w, _ in items], scales, block)

    def _add_groups(self, w: LinearW, G: int, mats) -> None:
        """wo_a as G matrices of L rows each (gemv per group), when the rows split on tiles."""
        L = w.out_features // G
        if w.fmt == "fp8" and L % w.block[0]:
            return                                         # falls back to the reference
        fmt = _fmt_of(w)
        raw = _raw(w)
        self.groups[_key(w)] = len(mats[fmt])
        for g in range(G):
            rows = slice(g * L, (g + 1) * L)
            s = w.scale[g * L // w.block[0]:(g + 1) * L // w.block[0]] if w.fmt == "fp8" else None
            mats[fmt].append((raw[rows], s))

    # ------------------------------------------------------------ helpers
    def _quantized_input(self, x: np.ndarray, w, quantize_input: bool) -> np.ndarray:
        if isinstance(w, LinearW) and w.quantized and quantize_input and self.num.quantize_activations:
            return act_quant_values(x, w.block[1])
        return np.ascontiguousarray(x, dtype=F32)

    def _gemv_rows(self, x2: np.ndarray, w) -> np.ndarray | None:
        """x2 [S, K] times one table matrix -> [S, O], or None if the matrix is unknown."""
        loc = self.where.get(_key(w))
        if loc is None:
            return None
        fmt, idx = loc
        table = self.tables[fmt]
        xp = self.k.prepare_x(fmt, x2, table.block[1])
        S = x2.shape[0]
        y = self.k.gemv_batch(table, np.full(S, idx, np.int64), xp, np.arange(S))
        return y.reshape(S, -1)

    def scratch(self, rows: int, cols: int) -> np.ndarray:
        """A float32 [rows, cols] buffer reused across calls (fresh pages cost page faults)."""
        if self._scratch.size < rows * cols:
            self._scratch = np.empty(rows * cols, F32)
        return self._scratch[:rows * cols].reshape(rows, cols)

    def _sgemm(self, x2: np.ndarray, w) -> np.ndarray:
        """x2 [S, K] @ W^T by dequantizing row blocks of W into float32 scratch (BLAS)."""
        O = _out_features(w)
        K = x2.shape[1]
        step = max(128, (SCRATCH_BYTES // (4 * K)) // 128 * 128)
        scratch = self.scratch(min(step, O), K)
        out = np.empty((x2.shape[0], O), F32)
        for r in range(0, O, step):
            n = min(step, O - r)
            np.matmul(x2, dequant_rows(w, r, n, scratch).T, out=out[:, r:r + n])
        return out

    def _apply(self, x2: np.ndarray, w) -> np.ndarray:
        """x2 [S, K] (already quantized as needed) @ W^T: gemv for few rows, else sgemm."""
        y = self._gemv_rows(x2, w) if x2.shape[0] <= GEMV_MAX_ROWS else None
        return self._sgemm(x2, w) if y is None else y

    def _matmul(self, x: np.ndarray, w, quantize_input: bool = True) -> np.ndarray:
        shape = x.shape
        x2 = self._quantized_input(x.reshape(-1, shape[-1]), w, quantize_input)
        y = self._apply(x2, w)
        return y.reshape(shape[:-1] + (y.shape[-1],))

    # ------------------------------------------------------------ the seam: matmuls
    def linear(self, x, w: LinearW, quantize_input: bool = True):
        return self._matmul(x, w, quantize_input)

    def dense(self, x, w):
        return self._matmul(x, w, False)

    def project(self, x, weights):
        """All products of one input, one gemv region per weight format (decode)."""
        if x.shape[0] > GEMV_MAX_ROWS:
            return super().project(x, weights)
        x2 = np.ascontiguousarray(x, dtype=F32)
        quant = [w for w in weights if isinstance(w, LinearW) and w.quantized]
        plain = [w for w in weights if not (isinstance(w, LinearW) and w.quantized)]
        S = x2.shape[0]
        rows = np.arange(S)
        done = {}
        for group, xin in ((quant, self._quantized_input(x2, quant[0], True) if quant else None),
                           (plain, x2)):
            if not group:
                continue
            r = self._jobs([w for w in group for _ in rows], xin, np.tile(rows, len(group)))
            if r is None:
                return super().project(x, weights)
            y, start = r
            for i, w in enumerate(group):
                a = start[i * S]
                done[id(w)] = y[a:a + S * _out_features(w)].reshape(S, -1)
        return [done[id(w)] for w in weights]

    def grouped_linear(self, x, w: LinearW):
        S, G, K = x.shape
        first = self.groups.get(_key(w))
        if first is None or S > GEMV_MAX_ROWS:
            return super().grouped_linear(x, w) if first is None else self._grouped_sgemm(x, w)
        fmt = _fmt_of(w)
        table = self.tables[fmt]
        x2 = np.ascontiguousarray(x.reshape(S * G, K), dtype=F32)
        xp = self.k.prepare_x(fmt, x2, table.block[1])
        mats = np.tile(first + np.arange(G), S)
        return self.k.gemv_batch(table, mats, xp, np.arange(S * G)).reshape(S, G, -1)

    def _grouped_sgemm(self, x, w: LinearW):
        S, G, K = x.shape
        L = w.out_features // G
        scratch = self.scratch(L, K)
        out = np.empty((S, G, L), F32)
        for g in range(G):
            np.matmul(x[:, g], dequant_rows(w, g * L, L, scratch).T, out=out[:, g])
        return out

    def read_kv(self, store, rows):
        return attn.read_kv(store, rows)

    def write_kv(self, store, rows, x):
        attn.write_kv(store, rows, x)

    def sparse_attn(self, q, kv, idx, sink, scale):
        return attn.sparse_attn(q, kv, idx, sink, scale)

    def index_scores(self, qi, wt, store, T):
        return attn.index_scores(qi, wt, store, T, round_bf16=not self.num.exact)

    def select_topk(self, scores, positions, ratio, topk):
        return attn.select_rows(scores, positions, ratio, topk)

    def moe_experts(self, x, idx, wts, w: MoEW, limit, shared_limit):
        if x.shape[0] > GEMV_MAX_ROWS:
            return self._moe_prefill(x, idx, wts, w, limit, shared_limit)
        return self._moe_decode(x, idx, wts, w, limit, shared_limit)

    def _gate_up(self, xq, e):
        """x w1^T and x w3^T; for many rows one sgemm over both dequantized weights."""
        if xq.shape[0] <= GEMV_MAX_ROWS or e.w1.in_features != e.w3.in_features:
            return self._apply(xq, e.w1), self._apply(xq, e.w3)
        n1 = e.w1.out_features
        both = self.scratch(n1 + e.w3.out_features, e.w1.in_features)
        dequant_rows(e.w1, 0, n1, both[:n1])
        dequant_rows(e.w3, 0, e.w3.out_features, both[n1:])
        gu = xq @ both.T
        return gu[:, :n1], gu[:, n1:]

    def _expert_rows(self, xq, e, limit, weight):
        """One expert on rows of an already quantized input (as RefBackend.expert)."""
        g, u = self._gate_up(xq, e)
        g, u = self.bf16(np.ascontiguousarray(g)), self.bf16(np.ascontiguousarray(u))
        if limit > 0:
            np.clip(u, -limit, limit, out=u)
            np.minimum(g, F32(limit), out=g)
        h = silu(g) * u
        if weight is not None:
            h *= weight[:, None]
        hq = self._quantized_input(self.bf16(h.astype(F32)), e.w2, True)
        return self.bf16(self._apply(hq, e.w2))

    def _moe_prefill(self, x, idx, wts, w: MoEW, limit, shared_limit):
        """Tokens grouped by expert; the input is quantized once for all of them (the
        quantization is per row, so a subset of rows quantizes identically)."""
        xq = self._quantized_input(x, w.shared.w1, True)
        y = np.zeros(x.shape, F32)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            y[rows] += self._expert_rows(xq[rows], w.experts[e], limit, wts[rows, slot])
        return y + self._expert_rows(xq, w.shared, shared_limit, None)

    def _moe_decode(self, x, idx, wts, w: MoEW, limit, shared_limit):
        """Routed experts of all rows and the shared expert: w1/w3 in one gemv region per
        weight format, the fused SwiGLU + quantization (moe_glue.py), w2 likewise, then the
        fused sum."""
        S, k = idx.shape
        experts = [w.experts[e] for e in idx.reshape(-1)] + [w.shared] * S     # n jobs
        rows = np.concatenate([np.repeat(np.arange(S), k), np.arange(S)])
        n = len(experts)
        inter = w.shared.w1.out_features
        w2 = w.shared.w2
        if any(e.w1.out_features != inter or e.w3.out_features != inter or e.w2.quantized != w2.quantized
               or e.w2.block[1] != w2.block[1] for e in experts):
            return super().moe_experts(x, idx, wts, w, limit, shared_limit)
        xq = self._quantized_input(x, w.shared.w1, True)
        gu = self._jobs([e.w1 for e in experts] + [e.w3 for e in experts], xq,
                        np.concatenate([rows, rows]))
        if gu is None:
            return super().moe_experts(x, idx, wts, w, limit, shared_limit)
        y_gu, off = gu
        lim = np.array([limit] * (S * k) + [shared_limit] * S, F32)
        weight = np.concatenate([wts.reshape(-1).astype(F32), np.ones(S, F32)])
        quant = self.num.quantize_activations and w2.quantized
        h = np.empty((n, inter), F32)
        moe_glue.swiglu_rows(y_gu, off[:n], off[n:], inter, lim, weight, self._rnd,
                             w2.block[1] if quant else 0, h)
        y = self._jobs([e.w2 for e in experts], h, np.arange(n))
        if y is None:
            return super().moe_experts(x, idx, wts, w, limit, shared_limit)
        y_flat, yoff = y
        order = np.argsort(idx, axis=1, kind="stable") + np.arange(S)[:, None] * k
        out = np.empty(x.shape, F32)
        moe_glue.combine_rows(y_flat, yoff, order, np.arange(S * k, n), self._rnd, out)
        return out

    def _jobs(self, weights, x2, xrows):
        """y_j = weights[j] @ x2[xrows[j]] for matrices of any sizes and table formats, one
        parallel region per format, into one float32 buffer -> (y, start) with job j's
        result at y[start[j]:start[j] + O_j] (jobs of one format are consecutive in y, in
        job order), or None if a matrix is unknown."""
        locs = [self.where.get(_key(wj)) for wj in weights]
        if any(loc is None for loc in locs):
            return None
        code = np.array([gemv.FORMATS.index(f) for f, _ in locs], np.int64)
        mats = np.array([i for _, i in locs], np.int64)
        xrows = np.asarray(xrows, np.int64)
        perm = np.argsort(code, kind="stable")                 # jobs grouped by format
        fmts = [(gemv.FORMATS[c], perm[code[perm] == c]) for c in np.unique(code)]
        sizes = np.empty(len(weights), np.int64)
        for fmt, sel in fmts:
            sizes[sel] = self.tables[fmt].out_features[mats[sel]]
        start = np.empty(len(weights), np.int64)
        start[perm] = np.concatenate([[0], np.cumsum(sizes[perm])[:-1]])
        y = np.empty(int(sizes.sum()), F32)
        for fmt, sel in fmts:
            table = self.tables[fmt]
            xp = self.k.prepare_x(fmt, x2, table.block[1])
            a = start[sel[0]]
            self.k.gemv_batch(table, mats[sel], xp, xrows[sel], out=y[a:a + sizes[sel].sum()])
        return y, start

    def logits(self, y, head):
        return self._matmul(y, head, False)
