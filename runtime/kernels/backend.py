"""The fast backend: same methods and semantics as RefBackend, computed by SIMD kernels.

Decode-sized calls (a few rows) run the matrix-vector kernels of gemv.py on the weights'
on-disk formats, many matrices per parallel region; prefill-sized calls use the bf16 GEMM
of gemm.py where it applies (gemm_ops.py), else dequantize weight rows into a float32
scratch buffer and multiply with BLAS sgemm. Attention-side work uses
attn.py. Results equal the reference's to float32 accumulation rounding; in exact mode the
two backends agree to float32 noise end to end.
"""
from __future__ import annotations

import numpy as np

from ..backend import RefBackend
from ..linear import LinearW
from ..nn import F32
from ..numerics import Numerics
from . import attn, gemv
from .actq import act_quant_values
from .attn_ops import AttnOps
from .decode_ops import DecodeOps
from .dequant import dequant_rows
from .fused_ops import FusedOps
from .gemm_ops import GemmOps
from .moe_ops import MoEOps
from .weight_index import (
    GEMV_MAX_ROWS,
    out_features,
    raw_array,
    table_format,
    weight_key,
)

SCRATCH_BYTES = 64 << 20          # float32 weight rows dequantized per sgemm step


def _job_plan(where, tables, weights, xrows):
    """Jobs grouped by table format -> (segments [(fmt, rows, x rows)], start [J], total):
    job j's result at y[start[j]:start[j] + O_j]; False when a matrix is not in the tables."""
    locs = [where.get(weight_key(wj)) for wj in weights]
    if any(loc is None for loc in locs):
        return False
    xrows = np.asarray(xrows, np.int64)
    fmts = sorted({f for f, _ in locs}, key=gemv.FORMATS.index)
    segments, start, a = [], np.empty(len(weights), np.int64), 0
    for fmt in fmts:
        sel = [j for j, (f, _) in enumerate(locs) if f == fmt]
        mats = np.array([locs[j][1] for j in sel], np.int64)
        sizes = tables[fmt].out_features[mats]
        start[sel] = a + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        a += int(sizes.sum())
        segments.append((fmt, mats, xrows[sel]))
    return segments, start, a


class FastBackend(DecodeOps, AttnOps, GemmOps, MoEOps, FusedOps, RefBackend):
    name = "fast"

    def __init__(self, num: Numerics):
        super().__init__(num)
        self.k = gemv.kernels()
        self.where: dict[int, tuple[str, int]] = {}    # weight_key(weight) -> (format, table row)
        self.tables: dict[str, gemv.MatTable] = {}
        self.mixed = gemv.MixedTable([])                # all tables as one (mixed regions)
        self.groups: dict[int, int] = {}               # weight_key(wo_a) -> first group row
        self._scratch = np.empty(0, F32)                # reused dequantization buffer
        self._moe_plans: dict = {}                      # id(MoEW) -> _MoEPlan | None
        self._moe_layouts: dict = {}                    # (plan, rows, k, ...) -> _MoELayout
        self._job_plans: dict = {}                      # (weight keys, rows) -> job layout
        self.compiled_moe = True                        # decode MoE via moe_step.py
        self.compiled_attention = True                  # decode attention via attn_step.py
        self.compiled_decode = True                     # decode blocks via decode_ops.py
        self.fused_decode = True                        # ... in one compiled call (decode_layer.py)
        self.bf16_gemm = self.k.variant == "avx512"     # prefill fp4/fp8 GEMMs via gemm.py
        self.ir_dequant = self.k.variant in ("avx2", "avx512")   # prefill dequantization via ir_dequant.py
        self._gemm_fits: dict[int, bool] = {}           # weight_key -> scales fit bf16
        self._gemm_checked = False                      # selfcheck.check_gemm ran

    # ------------------------------------------------------------ set-up
    def prepare(self, model) -> None:
        """Build one address table per weight format over every matrix the model uses."""
        mats: dict[str, list] = {"fp8": [], "fp4": [], "bf16": [], "f32": []}

        def add(w):
            if weight_key(w) in self.where:
                return
            fmt = table_format(w)
            scale = w.scale if isinstance(w, LinearW) else None
            self.where[weight_key(w)] = (fmt, len(mats[fmt]))
            mats[fmt].append((raw_array(w), scale))

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
        self.mixed = gemv.MixedTable(list(self.tables.values()))

    def _add_groups(self, w: LinearW, G: int, mats) -> None:
        """wo_a as G matrices of L rows each (gemv per group), when the rows split on tiles."""
        L = w.out_features // G
        if w.fmt == "fp8" and L % w.block[0]:
            return                                         # falls back to the reference
        fmt = table_format(w)
        raw = raw_array(w)
        self.groups[weight_key(w)] = len(mats[fmt])
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
        loc = self.where.get(weight_key(w))
        if loc is None:
            return None
        fmt, idx = loc
        table = self.tables[fmt]
        xp = self.k.prepare_x(fmt, x2, table.block[1])
        S = x2.shape[0]
        y = self.k.gemv_batch(table, np.full(S, idx, np.int64), xp, np.arange(S))
        return y.reshape(S, -1)

    def scratch(self, rows: int, cols: int) -> np.ndarray:
        """A float32 [rows, cols] buffer reused across calls (fresh pages cost page faults),
        64-byte aligned (so that dequantization can store non-temporally)."""
        if self._scratch.size < rows * cols:
            self._scratch = attn.aligned_empty(rows * cols)
        return self._scratch[:rows * cols].reshape(rows, cols)

    def dequant(self, w, r0: int, n: int, out: np.ndarray) -> np.ndarray:
        """Rows r0 .. r0+n-1 of w as float32 in out[:n] (dequant.dequant_rows)."""
        return dequant_rows(w, r0, n, out, use_ir=self.ir_dequant)

    def _sgemm(self, x2: np.ndarray, w) -> np.ndarray:
        """x2 [S, K] @ W^T by dequantizing row blocks of W into float32 scratch (BLAS).
        The result is 64-byte aligned (sparse_attn would copy an unaligned q)."""
        O = out_features(w)
        K = x2.shape[1]
        step = max(128, (SCRATCH_BYTES // (4 * K)) // 128 * 128)
        scratch = self.scratch(min(step, O), K)
        out = attn.aligned_empty((x2.shape[0], O))
        for r in range(0, O, step):
            n = min(step, O - r)
            np.matmul(x2, self.dequant(w, r, n, scratch).T, out=out[:, r:r + n])
        return out

    def _apply(self, x2: np.ndarray, w) -> np.ndarray:
        """x2 [S, K] (already quantized as needed) @ W^T: gemv for few rows, else the bf16
        GEMM where it applies, else sgemm."""
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = self._gemv_rows(x2, w)
        else:
            y = self._gemm_rows(self._pack(x2), [w])
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
        """All products of one input in one gemv region (decode): the quantized weights
        take the FP8-quantized input, the others x itself."""
        if x.shape[0] > GEMV_MAX_ROWS:
            return super().project(x, weights)
        x2 = np.ascontiguousarray(x, dtype=F32)
        quant = [w for w in weights if isinstance(w, LinearW) and w.quantized]
        plain = [w for w in weights if not (isinstance(w, LinearW) and w.quantized)]
        S = x2.shape[0]
        rows = np.arange(S)
        segments, xs, starts, total = [], [], {}, 0
        for group, xin in ((quant, self._quantized_input(x2, quant[0], True) if quant else None), (plain, x2)):
            if not group:
                continue
            plan = self._job_plan([w for w in group for _ in rows], np.tile(rows, len(group)))
            if plan is None:
                return super().project(x, weights)
            segs, start, n = plan
            segments += segs
            xs += [xin] * len(segs)
            for i, w in enumerate(group):
                starts[id(w)] = total + start[i * S]
            total += n
        y = self._run(segments, xs, total)
        return [y[starts[id(w)]:starts[id(w)] + S * out_features(w)].reshape(S, -1) for w in weights]

    def grouped_linear(self, x, w: LinearW):
        S, G, K = x.shape
        first = self.groups.get(weight_key(w))
        if first is None or S > GEMV_MAX_ROWS:
            return super().grouped_linear(x, w) if first is None else self._grouped_sgemm(x, w)
        fmt = table_format(w)
        table = self.tables[fmt]
        x2 = np.ascontiguousarray(x.reshape(S * G, K), dtype=F32)
        xp = self.k.prepare_x(fmt, x2, table.block[1])
        mats = np.tile(first + np.arange(G), S)
        return self.k.gemv_batch(table, mats, xp, np.arange(S * G)).reshape(S, G, -1)

    def _grouped_sgemm(self, x, w: LinearW):
        S, G, K = x.shape
        L = w.out_features // G
        y = self._grouped_gemm(x, w, L)
        if y is not None:
            return y
        scratch = self.scratch(L, K)
        out = np.empty((S, G, L), F32)
        for g in range(G):
            np.matmul(x[:, g], self.dequant(w, g * L, L, scratch).T, out=out[:, g])
        return out

    def read_kv(self, store, rows):
        return attn.read_kv(store, rows)

    def write_kv(self, store, rows, x):
        attn.write_kv(store, rows, x)

    def sparse_attn(self, q, kv, idx, sink, scale):
        return attn.sparse_attn(q, kv, idx, sink, scale, variant=self.k.variant)

    def index_scores(self, qi, wt, store, T):
        return attn.index_scores(qi, wt, store, T, round_bf16=not self.num.exact, variant=self.k.variant)

    def select_topk(self, scores, positions, ratio, topk):
        return attn.select_rows(scores, positions, ratio, topk)

    def _run(self, segments, xs, total):
        """Segments (fmt, table rows [J], x rows [J]) applied to the inputs xs (one float32
        [n, K] per segment) in ONE parallel region, whatever their formats; results
        concatenated in segment and job order into a float32 vector of `total` values."""
        y = np.empty(total, F32)
        self.k.gemv_mixed(self.mixed, [(fmt, mats, self.k.prepare_x(fmt, x2, self.tables[fmt].block[1]), xsel)
                                       for (fmt, mats, xsel), x2 in zip(segments, xs)], out=y)
        return y

    def _job_plan(self, weights, xrows):
        """Job layout of y_j = weights[j] @ x[xrows[j]] (see _job_plan), computed once per
        list of weights and rows (decode repeats the same lists every token); None if a
        matrix is not in the tables."""
        key = (tuple(weight_key(wj) for wj in weights), tuple(xrows))
        plan = self._job_plans.get(key)
        if plan is None:
            plan = self._job_plans[key] = _job_plan(self.where, self.tables, weights, xrows)
        return plan or None

    def logits(self, y, head):
        return self._matmul(y, head, False)
