"""The fast backend: same methods and semantics as RefBackend, computed by SIMD kernels.

Decode-sized calls (a few rows) run the matrix-vector kernels of gemv.py on the weights'
on-disk formats, many matrices per parallel region; prefill-sized calls dequantize weight
rows into a float32 scratch buffer and multiply with BLAS sgemm. Attention-side work uses
attn.py. Results equal the reference's to float32 accumulation rounding; in exact mode the
two backends agree to float32 noise end to end.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import RefBackend
from ..linear import LinearW
from ..nn import F32
from ..numerics import Numerics
from ..params import MoEW
from . import attn, gemv, moe_glue, moe_step
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


class _MoEPlan(NamedTuple):
    """Table rows of one MoE layer's matrices (see FastBackend._moe_plan)."""
    fmt: str                      # routed experts' format
    w1: np.ndarray                # int64 [E] table row of expert e's w1
    w3: np.ndarray
    w2: np.ndarray
    sfmt: str                     # shared expert's format
    s1: int
    s3: int
    s2: int
    inter: int
    w2_quantized: bool
    w2_block: int


class _MoELayout(NamedTuple):
    """Routing-independent job arrays of a decode MoE step (FastBackend._moe_layout)."""
    n: int                        # jobs: S*k routed + S shared
    x13: np.ndarray               # x rows of the routed w1 then w3 jobs
    s13: np.ndarray               # shared expert: table rows (w1 x S, w3 x S) and x rows
    xs13: np.ndarray
    goff: np.ndarray              # per job: offsets of its gate and up outputs
    uoff: np.ndarray
    lim: np.ndarray               # per job: SwiGLU clamp
    ones: np.ndarray              # routing weight of the shared jobs
    x2: np.ndarray                # x rows (of h) of the routed w2 jobs
    s2: np.ndarray                # shared w2: table rows and x rows (of h's shared part)
    xs: np.ndarray
    row_base: np.ndarray          # [S, 1]: first routed job of each row
    yoff: np.ndarray              # per job: offset of its w2 output
    shared_jobs: np.ndarray       # [S]: the shared job of each row


def _moe_plan(where, w: MoEW) -> _MoEPlan | None:
    experts = list(w.experts)
    sh = w.shared
    inter = sh.w1.out_features
    for e in experts + [sh]:
        if (e.w1.out_features != inter or e.w3.out_features != inter or e.w2.in_features != inter
                or e.w2.quantized != sh.w2.quantized or e.w2.block[1] != sh.w2.block[1]):
            return None
    locs = {name: [where.get(_key(getattr(e, name))) for e in experts + [sh]] for name in ("w1", "w3", "w2")}
    if any(loc is None for v in locs.values() for loc in v):
        return None
    fmts = {loc[0] for v in locs.values() for loc in v[:-1]}
    sfmts = {v[-1][0] for v in locs.values()}
    if len(fmts) != 1 or len(sfmts) != 1:
        return None
    rows = {name: np.array([loc[1] for loc in v[:-1]], np.int64) for name, v in locs.items()}
    return _MoEPlan(fmts.pop(), rows["w1"], rows["w3"], rows["w2"], sfmts.pop(), locs["w1"][-1][1],
                    locs["w3"][-1][1], locs["w2"][-1][1], inter, sh.w2.quantized, sh.w2.block[1])


def _job_plan(where, tables, weights, xrows):
    """Jobs grouped by table format -> (segments [(fmt, rows, x rows)], start [J], total):
    job j's result at y[start[j]:start[j] + O_j]; False when a matrix is not in the tables."""
    locs = [where.get(_key(wj)) for wj in weights]
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


class FastBackend(FusedOps, RefBackend):
    name = "fast"

    def __init__(self, num: Numerics):
        super().__init__(num)
        self.k = gemv.kernels()
        self.where: dict[int, tuple[str, int]] = {}    # _key(weight) -> (format, table row)
        self.tables: dict[str, gemv.MatTable] = {}
        self.mixed = gemv.MixedTable([])                # all tables as one (mixed regions)
        self.groups: dict[int, int] = {}               # _key(wo_a) -> first group row
        self._scratch = np.empty(0, F32)                # reused dequantization buffer
        self._moe_plans: dict = {}                      # id(MoEW) -> _MoEPlan | None
        self._moe_layouts: dict = {}                    # (plan, rows, k, ...) -> _MoELayout
        self._job_plans: dict = {}                      # (weight keys, rows) -> job layout
        self._step_layouts: dict = {}                   # (K, b1) -> moe_step x-layout constants
        self.compiled_moe = True                        # decode MoE via moe_step.py

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
        self.mixed = gemv.MixedTable(list(self.tables.values()))

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
        """x2 [S, K] @ W^T by dequantizing row blocks of W into float32 scratch (BLAS).
        The result is 64-byte aligned (sparse_attn would copy an unaligned q)."""
        O = _out_features(w)
        K = x2.shape[1]
        step = max(128, (SCRATCH_BYTES // (4 * K)) // 128 * 128)
        scratch = self.scratch(min(step, O), K)
        out = attn.aligned_empty((x2.shape[0], O))
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
        return [y[starts[id(w)]:starts[id(w)] + S * _out_features(w)].reshape(S, -1) for w in weights]

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

    def route(self, logits, bias, hash_idx, k, score_func, route_scale):
        S, E = logits.shape
        if score_func != "sqrtsoftplus" or k > 8 or k > E:   # numpy sums k > 8 pairwise
            return super().route(logits, bias, hash_idx, k, score_func, route_scale)
        hidx = np.zeros((0, k), np.int64) if hash_idx is None else np.ascontiguousarray(hash_idx, dtype=np.int64)
        if hash_idx is not None and (hidx.shape != (S, k) or hidx.min() < 0 or hidx.max() >= E):
            raise ValueError(f"hash expert ids: expected [{S}, {k}] ids below {E}, got {list(hidx.shape)}")
        b = np.zeros(E, F32) if bias is None else np.ascontiguousarray(bias, dtype=F32)
        idx, wts = np.empty((S, k), np.int64), np.empty((S, k), F32)
        moe_glue.route_rows(np.ascontiguousarray(logits, dtype=F32), b, hidx, k, F32(route_scale), idx, wts)
        return idx, wts

    def moe_experts(self, x, idx, wts, w: MoEW, limit, shared_limit):
        if x.shape[0] > GEMV_MAX_ROWS:
            return self._moe_prefill(x, idx, wts, w, limit, shared_limit)
        return self._moe_decode(x, idx, wts, w, limit, shared_limit)

    def _gate_up(self, xq, e):
        """[x w1^T | x w3^T] as one float32 [n, 2 * inter] array; for many rows one sgemm
        over both dequantized weights."""
        n1 = e.w1.out_features
        if xq.shape[0] <= GEMV_MAX_ROWS or e.w1.in_features != e.w3.in_features:
            return np.concatenate([self._apply(xq, e.w1), self._apply(xq, e.w3)], axis=1)
        both = self.scratch(n1 + e.w3.out_features, e.w1.in_features)
        dequant_rows(e.w1, 0, n1, both[:n1])
        dequant_rows(e.w3, 0, e.w3.out_features, both[n1:])
        return xq @ both.T

    def _expert_rows(self, xq, e, limit, weight):
        """One expert on rows of an already quantized input (as RefBackend.expert); the
        SwiGLU, routing weight and w2 input quantization fused as in decode."""
        n, inter = xq.shape[0], e.w1.out_features
        if e.w3.out_features != inter:
            return super().expert(xq, e, limit, weight)
        gu = np.ascontiguousarray(self._gate_up(xq, e), dtype=F32)               # [n, 2 * inter]
        rows = np.arange(n) * 2 * inter
        quant = self.num.quantize_activations and e.w2.quantized
        h = np.empty((n, inter), F32)
        moe_glue.swiglu_rows(gu.reshape(-1), rows, rows + inter, inter, np.full(n, limit, F32),
                             np.ones(n, F32) if weight is None else np.asarray(weight, F32), self._rnd,
                             e.w2.block[1] if quant else 0, h)
        return self.bf16(self._apply(h, e.w2))

    def _moe_prefill(self, x, idx, wts, w: MoEW, limit, shared_limit):
        """Tokens grouped by expert; the input is quantized once for all of them (the
        quantization is per row, so a subset of rows quantizes identically)."""
        xq = self._quantized_input(x, w.shared.w1, True)
        y = np.zeros(x.shape, F32)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            y[rows] += self._expert_rows(xq[rows], w.experts[e], limit, wts[rows, slot])
        return y + self._expert_rows(xq, w.shared, shared_limit, None)

    def _moe_plan(self, w: MoEW):
        """Per MoE layer, once: table rows of every expert's w1, w3, w2 (index = expert id)
        and of the shared expert's, or None when the decode path does not apply (experts of
        mixed formats or sizes, or matrices missing from the tables)."""
        key = id(w)
        if key not in self._moe_plans:
            self._moe_plans[key] = _moe_plan(self.where, w)
        return self._moe_plans[key]

    def _moe_decode(self, x, idx, wts, w: MoEW, limit, shared_limit):
        """Routed experts of all rows and the shared expert: w1/w3 of all of them in one
        gemv region (FP4 and FP8 jobs together), the fused SwiGLU + quantization
        (moe_glue.py), all w2 in a second region, then the fused sum. Jobs: routed (row s,
        slot t) is job s*k + t, the shared expert of row s is job S*k + s."""
        plan = self._moe_plan(w)
        if plan is None:
            return super().moe_experts(x, idx, wts, w, limit, shared_limit)
        if self.compiled_moe:
            out = self._moe_compiled(x, idx, wts, w, plan, limit, shared_limit)
            if out is not None:
                return out
        S, k = idx.shape
        d, inter = x.shape[1], plan.inter
        lay = self._moe_layout(plan, S, k, d, limit, shared_limit)
        e = idx.reshape(-1)
        xq = self._quantized_input(x, w.shared.w1, True)
        # w1 and w3: gate outputs of all jobs first, then the up outputs (job order)
        gu = self._run([(plan.fmt, np.concatenate([plan.w1[e], plan.w3[e]]), lay.x13), (plan.sfmt, lay.s13, lay.xs13)],
                       [xq, xq], 2 * lay.n * inter)
        weight = np.concatenate([wts.reshape(-1).astype(F32), lay.ones])
        quant = self.num.quantize_activations and plan.w2_quantized
        h = np.empty((lay.n, inter), F32)
        moe_glue.swiglu_rows(gu, lay.goff, lay.uoff, inter, lay.lim, weight, self._rnd,
                             plan.w2_block if quant else 0, h)
        y = self._run([(plan.fmt, plan.w2[e], lay.x2), (plan.sfmt, lay.s2, lay.xs)], [h[:S * k], h[S * k:]],
                      lay.n * d)
        order = np.argsort(idx, axis=1, kind="stable") + lay.row_base
        out = np.empty(x.shape, F32)
        moe_glue.combine_rows(y, lay.yoff, order, lay.shared_jobs, self._rnd, out)
        return out

    def _moe_compiled(self, x, idx, wts, w: MoEW, plan, limit, shared_limit):
        """The step as three compiled calls around its two gemv regions (moe_step.py) where
        it applies, else None."""
        if (self.k.variant not in ("avx512", "avx2") or not self.num.quantize_activations or plan.fmt != "fp4"
                or plan.sfmt != "fp8" or not plan.w2_quantized or not w.shared.w1.quantized):
            return None
        S, k = idx.shape
        d, b1, inter = x.shape[1], self.tables["fp8"].block[1], plan.inter
        o4, o8 = self.mixed.offset["fp4"], self.mixed.offset["fp8"]
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        ok, xp, info, mats, xsel = moe_step.stage1(
            np.ascontiguousarray(x, dtype=F32), idx, plan.w1 + o4, plan.w3 + o4, plan.s1 + o8, plan.s3 + o8,
            w.shared.w1.block[1], *self._step_layout(d, b1))
        if not ok:
            return None
        gu = self.k.drive_rows(self.mixed, mats, xsel, xp, info, np.empty(2 * (S * k + S) * inter, F32))
        ok, xp, info, mats, xsel = moe_step.stage2(
            gu, idx, np.ascontiguousarray(wts, dtype=F32), plan.w2 + o4, plan.s2 + o8, inter, F32(limit),
            F32(shared_limit), plan.w2_block, self._rnd, *self._step_layout(inter, b1))
        if not ok:
            return None
        y = self.k.drive_rows(self.mixed, mats, xsel, xp, info, np.empty((S * k + S) * d, F32))
        out = np.empty(x.shape, F32)
        moe_step.stage3(y, idx, self._rnd, out)
        return out

    def _step_layout(self, K, b1):
        key = (K, b1)
        if key not in self._step_layouts:
            lay = moe_step.Layout(self.k.variant, K, b1)
            self._step_layouts[key] = (lay.int_header, lay.int_len, lay.fp8_idx, lay.fp8_words, lay.fp8_scale,
                                       lay.fp8_len)
        return self._step_layouts[key]

    def _moe_layout(self, plan, S, k, d, limit, shared_limit):
        """The job arrays of a decode MoE step that do not depend on the routing (cached)."""
        key = (id(plan), S, k, d, float(limit), float(shared_limit))
        lay = self._moe_layouts.get(key)
        if lay is None:
            nr, n, inter = S * k, S * k + S, plan.inter
            rows_r, rows_s = np.repeat(np.arange(S), k), np.arange(S)
            lay = self._moe_layouts[key] = _MoELayout(
                n=n, x13=np.concatenate([rows_r, rows_r]), s13=np.array([plan.s1] * S + [plan.s3] * S, np.int64),
                xs13=np.tile(rows_s, 2), goff=np.concatenate([np.arange(nr), 2 * nr + np.arange(S)]) * inter,
                uoff=np.concatenate([nr + np.arange(nr), 2 * nr + S + np.arange(S)]) * inter,
                lim=np.array([limit] * nr + [shared_limit] * S, F32), ones=np.ones(S, F32), x2=np.arange(nr),
                s2=np.full(S, plan.s2, np.int64), xs=rows_s, row_base=np.arange(S)[:, None] * k,
                yoff=np.arange(n) * d, shared_jobs=np.arange(nr, n))
        return lay

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
        key = (tuple(_key(wj) for wj in weights), tuple(xrows))
        plan = self._job_plans.get(key)
        if plan is None:
            plan = self._job_plans[key] = _job_plan(self.where, self.tables, weights, xrows)
        return plan or None

    def logits(self, y, head):
        return self._matmul(y, head, False)
