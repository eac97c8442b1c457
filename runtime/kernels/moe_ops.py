"""The MoE side of the fast backend: the router, the decode step and prefill's experts.

A mixin that FastBackend combines with the matrix kernels (it uses the backend's `where`,
`tables`, `mixed`, `k`, `num`, `_rnd`, `bf16`, `_apply`, `_run`, `_quantized_input` and
`scratch`). Decode (up to GEMV_MAX_ROWS rows): the step of moe_step.py (three compiled
calls around two gemv regions) where it applies, else the general path here, which calls
the same kernels from Python; both use job plans built once per layer. Prefill: tokens
grouped per expert, w1 and w3 dequantized for one sgemm, the fused SwiGLU kernel, w2.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..nn import F32
from ..params import MoEW
from . import moe_glue, moe_step
from .weight_index import GEMV_MAX_ROWS, weight_key


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
    mixed: tuple                  # the six row sets above as rows of the mixed table


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


def _moe_plan(where, offset, w: MoEW) -> _MoEPlan | None:
    experts = list(w.experts)
    sh = w.shared
    inter = sh.w1.out_features
    for e in experts + [sh]:
        if (e.w1.out_features != inter or e.w3.out_features != inter or e.w2.in_features != inter
                or e.w2.quantized != sh.w2.quantized or e.w2.block[1] != sh.w2.block[1]):
            return None
    locs = {name: [where.get(weight_key(getattr(e, name))) for e in experts + [sh]] for name in ("w1", "w3", "w2")}
    if any(loc is None for v in locs.values() for loc in v):
        return None
    fmts = {loc[0] for v in locs.values() for loc in v[:-1]}
    sfmts = {v[-1][0] for v in locs.values()}
    if len(fmts) != 1 or len(sfmts) != 1:
        return None
    rows = {name: np.array([loc[1] for loc in v[:-1]], np.int64) for name, v in locs.items()}
    fmt, sfmt = fmts.pop(), sfmts.pop()
    shared = [locs[name][-1][1] for name in ("w1", "w3", "w2")]
    mixed = tuple(rows[name] + offset[fmt] for name in ("w1", "w3", "w2")) + tuple(r + offset[sfmt] for r in shared)
    return _MoEPlan(fmt, rows["w1"], rows["w3"], rows["w2"], sfmt, *shared, inter, sh.w2.quantized, sh.w2.block[1],
                    mixed)


class MoEOps:
    """FastBackend's MoE methods (see the module docstring)."""

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
        both = self._gemm_rows(self._pack(xq), [e.w1, e.w3])      # [n, 2 * inter]
        if both is not None:
            return both
        both = self.scratch(n1 + e.w3.out_features, e.w1.in_features)
        self.dequant(e.w1, 0, n1, both[:n1])
        self.dequant(e.w3, 0, e.w3.out_features, both[n1:])
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
            self._moe_plans[key] = _moe_plan(self.where, self.mixed.offset, w)
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

    def _moe_step_applies(self, w: MoEW, plan) -> bool:
        """Whether the compiled MoE step (moe_step.py) covers this layer: avx512 / avx2
        kernels, quantized activations, FP4 routed and FP8 shared experts."""
        return (self.k.variant in ("avx512", "avx2") and self.num.quantize_activations and plan.fmt == "fp4"
                and plan.sfmt == "fp8" and plan.w2_quantized and w.shared.w1.quantized)

    def _moe_compiled(self, x, idx, wts, w: MoEW, plan, limit, shared_limit, bufs=None):
        """The step as three compiled calls around its two gemv regions (moe_step.py) where
        it applies, else None. bufs: float32 vectors for the two regions' results (reused
        by the compiled decode block), else fresh ones."""
        if not self._moe_step_applies(w, plan):
            return None
        S, k = idx.shape
        d, b1, inter = x.shape[1], self.tables["fp8"].block[1], plan.inter
        m1, m3, m2, ms1, ms3, ms2 = plan.mixed
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        ok, xp, info, mats, xsel = moe_step.stage1(
            np.ascontiguousarray(x, dtype=F32), idx, m1, m3, ms1, ms3, w.shared.w1.block[1],
            *moe_step.x_layout(self.k.variant, d, b1))
        if not ok:
            return None
        n = S * k + S
        fits = bufs is not None and bufs[0].size == 2 * n * inter and bufs[1].size == n * d
        gu, y = bufs if fits else (np.empty(2 * n * inter, F32), np.empty(n * d, F32))
        self.k.drive_rows(self.mixed, mats, xsel, xp, info, gu)
        ok, xp, info, mats, xsel = moe_step.stage2(
            gu, idx, np.ascontiguousarray(wts, dtype=F32), m2, ms2, inter, F32(limit),
            F32(shared_limit), plan.w2_block, self._rnd, *moe_step.x_layout(self.k.variant, inter, b1))
        if not ok:
            return None
        self.k.drive_rows(self.mixed, mats, xsel, xp, info, y)
        out = np.empty(x.shape, F32)
        moe_step.stage3(y, idx, self._rnd, out)
        return out

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
