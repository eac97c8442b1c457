"""The fast backend's `block` for one decoded token: the block as nine gemv regions with
compiled stages between them (decode_step.py), the attention step (attn_step.py) and the
MoE step (moe_step.py). A mixin.

Per layer it replaces the ~60 Python-level operations of block.py's per-operation path by
~15 calls whose job arrays were laid out once per layer (`_LayerPlan`); the result is
bit-identical to that path. It applies to decode in the model's default numerics on the
avx512 / avx2 kernels, with FP8-quantized attention projections and the MoE and attention
steps' own conditions; anything else takes block.py's path.

By default (`fused_decode`) the same calls are made from one compiled function per layer
(decode_layer.py), which removes the Python between them; the sequence here stays as its
reference and for layers that function does not cover (the MoE outside the compiled step,
the attention outside attn_step.py).

The per-layer buffers (prepared x rows, region results) are reused by every call, so a
backend instance runs one forward pass at a time (its dequantization scratch and the
attention step's key buffer assume the same).
"""
from __future__ import annotations

import weakref

import numba
import numpy as np

from ..linear import LinearW
from ..nn import F32
from . import decode_layer, decode_step, gemv, moe_glue, moe_step, prep
from .aligned import aligned_empty, zeros_rows
from .attn_ops import writable_f32
from .pack import Pack
from .weight_index import out_features, table_format, weight_key

_NO_SPEC = (np.int64(-1), np.int64(0), np.zeros(0, np.int64), np.zeros(0, np.int64), np.int64(0), F32(0))


def _spec(variant: str, fmt: str, K: int, b1: int) -> tuple:
    """decode_step.prep_row's description of prep.prepare for one format and K."""
    code = np.int64(gemv.FORMATS.index(fmt))
    if fmt == "f32":
        return (code, np.int64(0), _NO_SPEC[2], _NO_SPEC[3], np.int64(0), F32(1))
    idx, scale = prep.layout(variant, fmt, K, b1)
    idx = np.ascontiguousarray(idx, np.int64)
    if variant == "avx512" and fmt in prep.TERM_FORMATS:
        alt = prep.layout("avx2", fmt, K, b1)[0] if fmt == "bf16" else _NO_SPEC[3]
        return (code, np.int64(1), idx, np.ascontiguousarray(alt, np.int64),
                np.int64(prep._TERM_CHUNK[fmt]), F32(scale))
    return (code, np.int64(2), idx, _NO_SPEC[3], np.int64(0), F32(scale))


def _spec_len(spec, K: int) -> int:
    """Floats prep_row may write for a spec of a K-wide x."""
    code, mode, idx, alt = spec[:4]
    if code < 0:
        return 0
    if mode == 0:
        return K
    return max(idx.size * 3 // 2 if mode == 1 else idx.size, alt.size)


def _hash_experts(f, ids, k: int) -> np.ndarray:
    """A hash layer's expert ids of the token [1, k], checked against the router's size."""
    hidx = np.ascontiguousarray(f.tid2eid[ids], dtype=np.int64).reshape(1, k)
    n = f.gate.shape[0]
    if hidx.min() < 0 or hidx.max() >= n:
        raise ValueError(f"hash expert ids must lie below {n}")
    return hidx


class _Site:
    """One gemv region of the block: its jobs (rows of the mixed table, x rows), their
    output offsets, the result buffer."""

    def __init__(self, rows, xsel, sizes):
        self.mats = np.ascontiguousarray(rows, np.int64)
        self.xsel = np.ascontiguousarray(xsel, np.int64)
        self.off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.y = np.empty(int(self.off[-1]), F32)

    def part(self, j: int) -> np.ndarray:
        return self.y[self.off[j]:self.off[j + 1]].reshape(1, -1)


class _LayerPlan:
    """Everything one block's decode needs besides the token's values (built once)."""


class DecodeOps:
    """Needs the backend's tables (`where`, `groups`, `mixed`, `k`), `num`, `attend` and
    `_compiled_attend` (attn_ops), `_moe_plan` / `_moe_step_applies` / `_moe_compiled` /
    `_moe_decode` (moe_ops), and `self.compiled_decode` (False: block.py's path),
    `self.fused_decode` (False: the calls from Python)."""

    def _row(self, w) -> int | None:
        loc = self.where.get(weight_key(w))
        return None if loc is None else self.mixed.offset[loc[0]] + loc[1]

    def _site(self, weights, xrows):
        rows = [self._row(w) for w in weights]
        if any(r is None for r in rows):
            return None
        return _Site(rows, xrows, [out_features(w) for w in weights])

    def _decode_plan(self, cfg, w):
        plans = self.__dict__.setdefault("_decode_plans", {})
        key = id(w)
        if key not in plans or plans[key][0] is not w:
            plans[key] = (w, self._build_plan(cfg, w))
        return plans[key][1]

    def _build_plan(self, cfg, w):
        """The layer's sites and x specs, or None when the block does not fit the scope."""
        v, a, f = self.k.variant, w.attn, w.ffn
        num = self.num
        if v not in ("avx512", "avx2") or num.exact or not num.quantize_activations:
            return None
        quant = [a.wq_a, a.wkv, a.wq_b, a.wo_b] + ([a.indexer.wq_b] if a.indexer is not None else [])
        if not all(isinstance(x, LinearW) and x.quantized and x.fmt == "fp8" for x in quant):
            return None
        if len({x.block[1] for x in quant}) != 1 or weight_key(a.wo_a) not in self.groups:
            return None
        if (cfg.score_func != "sqrtsoftplus" or not 0 < cfg.n_activated_experts <= min(8, f.gate.shape[0])
                or self._moe_plan(f) is None):
            return None
        b1 = self.tables["fp8"].block[1] if "fp8" in self.tables else 128
        p = _LayerPlan()
        p.qblock = quant[0].block[1]
        d, G = cfg.dim, cfg.o_groups
        proj = [a.wq_a, a.wkv]
        if a.compressor is not None:
            proj += [a.compressor.wkv, a.compressor.wgate]
        if a.indexer is not None:
            proj += [a.indexer.weights_proj, a.indexer.compressor.wkv, a.indexer.compressor.wgate]
        raw = proj[2:]
        p.proj = self._site(proj, [0, 0] + [1] * len(raw))
        p.q = self._site([a.wq_b] + ([a.indexer.wq_b] if a.indexer is not None else []), [0] * (1 + (a.indexer is not None)))
        p.hc_attn = self._site([w.hc_attn.fn], [0])
        p.hc_ffn = self._site([w.hc_ffn.fn], [0])
        p.gate = self._site([f.gate], [0])
        p.wo_b = self._site([a.wo_b], [0])
        first = self.groups[weight_key(a.wo_a)]
        wfmt = table_format(a.wo_a)
        L = a.wo_a.out_features // G
        p.wo_a = _Site(self.mixed.offset[wfmt] + first + np.arange(G), np.arange(G), [L] * G)
        if any(s is None for s in (p.proj, p.q, p.hc_attn, p.hc_ffn, p.gate, p.wo_b)):
            return None
        p.spec_q = _spec(v, "fp8", d, b1)
        raw_fmts = {table_format(x) for x in raw}
        if len(raw_fmts) > 1:
            return None
        p.spec_raw = _spec(v, raw_fmts.pop(), d, b1) if raw else _NO_SPEC
        p.spec_qr = _spec(v, "fp8", a.wq_b.in_features, b1)
        p.spec_hc_attn = _spec(v, table_format(w.hc_attn.fn), w.hc_attn.fn.shape[1], b1)
        p.spec_hc_ffn = _spec(v, table_format(w.hc_ffn.fn), w.hc_ffn.fn.shape[1], b1)
        p.spec_gate = _spec(v, table_format(f.gate), d, b1)
        p.spec_woa = _spec(v, wfmt, a.wo_a.in_features, b1)
        p.spec_wob = _spec(v, "fp8", a.wo_b.in_features, b1)
        widths = ((p.spec_q, d), (p.spec_raw, d), (p.spec_qr, a.wq_b.in_features),
                  (p.spec_hc_attn, w.hc_attn.fn.shape[1]), (p.spec_hc_ffn, w.hc_ffn.fn.shape[1]), (p.spec_gate, d),
                  (p.spec_woa, a.wo_a.in_features), (p.spec_wob, a.wo_b.in_features))
        p.xcat = zeros_rows(max(2, G), max(_spec_len(s, K) for s, K in widths))
        p.xinfo = np.zeros((max(2, G), 3), np.int64)
        p.norms = tuple(writable_f32(x) for x in (w.attn_norm, a.q_norm, w.ffn_norm))
        p.bias = np.zeros(f.gate.shape[0], F32) if f.bias is None else writable_f32(f.bias)
        k, inter = cfg.n_activated_experts, self._moe_plan(f).inter
        p.moe_out = (np.empty(2 * (k + 1) * inter, F32), np.empty((k + 1) * d, F32))   # w1|w3, w2 results
        p.fused = self._fused_parts(cfg, w, p, b1)
        return p

    def _limits(self, cfg) -> tuple[float, float]:
        """SwiGLU clamps (routed experts, shared expert; 0 = none) in these numerics."""
        limit = cfg.swiglu_limit
        return limit, (limit if self.num.shared_clamp else 0.0)

    def _fused_parts(self, cfg, w, p, b1):
        """The layer's constants for decode_layer.layer_step as (a Pack of them, the empty
        hash ids, the work buffers in the pack), or None when its MoE does not take the
        compiled step (moe_ops._moe_step_applies)."""
        f, mp = w.ffn, self._moe_plan(w.ffn)
        if not self._moe_step_applies(f, mp):
            return None
        d, k, v = cfg.dim, cfg.n_activated_experts, self.k.variant
        H, D = cfg.n_heads, cfg.head_dim
        limit, shared_limit = self._limits(cfg)
        t = self.mixed
        table = (t.addr, t.dims, t.xlen(v), np.int64(gemv.UNIT_BYTES), np.int64(numba.config.NUMBA_NUM_THREADS))
        sites = tuple((s.mats, s.xsel, s.off, s.y) for s in (p.hc_attn, p.proj, p.q, p.wo_a, p.wo_b, p.hc_ffn, p.gate))
        specs = (p.spec_hc_attn, p.spec_q, p.spec_raw, p.spec_qr, p.spec_woa, p.spec_wob, p.spec_hc_ffn, p.spec_gate,
                 _NO_SPEC)
        hca, hcf = w.hc_attn, w.hc_ffn
        hcp = (writable_f32(hca.base), writable_f32(hca.scale), writable_f32(hcf.base), writable_f32(hcf.scale),
               cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps, *p.norms, p.qblock, cfg.o_groups)
        m1, m3, m2, ms1, ms3, ms2 = mp.mixed
        moe = (p.bias, k, F32(cfg.route_scale), m1, m3, ms1, ms3, m2, ms2, f.shared.w1.block[1],
               moe_step.x_layout(v, d, b1), moe_step.x_layout(v, mp.inter, b1), mp.inter, F32(limit),
               F32(shared_limit), mp.w2_block, self._rnd, *p.moe_out)
        work = (np.empty((1, d), F32), np.empty((1, cfg.hc_mult), F32), np.empty((1, cfg.hc_mult, cfg.hc_mult), F32),
                np.empty((1, cfg.hc_mult, d), F32), np.empty((1, k), np.int64), np.empty((1, k), F32))
        consts = (table, p.xcat, p.xinfo, sites, specs, hcp, w.attn.indexer is not None, moe, work,
                  aligned_empty((1, H, D)))
        return Pack(consts), np.zeros((0, k), np.int64), work

    def _seq_pack(self, cfg, w, lc, rope):
        """(attention plan, a Pack of attend_one's arguments fixed for this layer of the
        sequence whose layer cache is lc), built on the layer's first decoded token of the
        sequence; (plan, None) when the compiled attention step cannot take the layer.
        Kept while lc lives (the pack references the cache's arrays, not lc itself)."""
        packs = self.__dict__.setdefault("_seq_packs", {})
        hit = packs.get(id(lc))
        if hit is not None and hit[0]() is lc:
            return hit[1], hit[2]
        a = w.attn
        plan = self._attn_plan(cfg, w.layer, a, rope)
        pack = Pack(self._step_fixed(cfg, plan, a, lc)) if plan.ok else None
        key = id(lc)

        def forget(ref, packs=packs, key=key):
            if packs.get(key, (None,))[0] is ref:
                del packs[key]
        packs[key] = (weakref.ref(lc, forget), plan, pack)
        return plan, pack

    def _fused_block(self, cfg, w, X, ids, p0, lc, rope, p):
        """The block in one compiled call (decode_layer.py), or None where it does not apply."""
        if p.fused is None:
            return None
        plan, seq = self._seq_pack(cfg, w, lc, rope)
        if seq is None or not self.compiled_attention:
            return None
        layer, hidx, work = p.fused
        f = w.ffn
        X = np.ascontiguousarray(X, dtype=F32)
        if f.tid2eid is not None:
            hidx = _hash_experts(f, ids, cfg.n_activated_experts)
        X3 = np.empty(X.shape, F32)
        n_comp, status = decode_layer.layer_step(self.k.variant)(
            X, int(p0), numba.get_num_threads(), self._step_keys(cfg, plan, p0), hidx, X3, layer, seq)
        if plan.ratio > 0:
            lc.n_comp = n_comp
        if status != decode_layer.OK:                     # the MoE's general path, then the residual
            x, post, comb, X2, idx, wts = work
            y = self._moe_decode(x, idx, wts, f, *self._limits(cfg))
            decode_step.residual_out(y, X2, post, comb, X3, _NO_SPEC, p.xcat, p.xinfo)
        return X3

    def _drive(self, site, xcat, xinfo):
        t = self.mixed
        return gemv._driver(self.k.variant)(t.addr, t.dims, t.xlen(self.k.variant), site.mats, site.xsel, xcat, xinfo,
                                            gemv.UNIT_BYTES, numba.config.NUMBA_NUM_THREADS, site.y)

    def block(self, cfg, w, X, ids, p0, lc, rope):
        plan = self._decode_plan(cfg, w) if self.compiled_decode and X.shape[0] == 1 else None
        if plan is None or not self._compiled_attend(lc, X.shape[0]):
            return super().block(cfg, w, X, ids, p0, lc, rope)
        if self.fused_decode:
            out = self._fused_block(cfg, w, X, ids, p0, lc, rope, plan)
            if out is not None:
                return out
        a, f, p = w.attn, w.ffn, plan
        hc = (cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
        xcat, xinfo = p.xcat, p.xinfo
        X = np.ascontiguousarray(X, dtype=F32)                             # [1, hc, d]
        M = w.hc_attn.fn.shape[0]
        # attention: x = rmsnorm(hc_pre(X)); projections of x; of qr; attend; wo_a; wo_b
        decode_step.mix_in(X, p.spec_hc_attn, xcat, xinfo)
        mix = self._drive(p.hc_attn, xcat, xinfo).reshape(1, M)
        x = np.empty((1, cfg.dim), F32)
        post, comb = np.empty((1, cfg.hc_mult), F32), np.empty((1, cfg.hc_mult, cfg.hc_mult), F32)
        decode_step.block_in(X, mix, w.hc_attn.base, w.hc_attn.scale, *hc, p.norms[0], p.qblock, p.spec_q,
                             p.spec_raw, x, post, comb, xcat, xinfo)
        self._drive(p.proj, xcat, xinfo)
        decode_step.query_in(p.proj.part(0).reshape(-1), p.norms[1], cfg.norm_eps, p.qblock, p.spec_qr, xcat, xinfo)
        self._drive(p.q, xcat, xinfo)
        qs = [p.q.part(j) for j in range(len(p.q.mats))]
        proj = [p.proj.part(j) for j in range(1, len(p.proj.mats))]
        o = self.attend(cfg, w.layer, a, lc, p0, qs, proj, rope)                # [1, H, D]
        decode_step.groups_in(np.ascontiguousarray(o, dtype=F32), cfg.o_groups, p.spec_woa, xcat, xinfo)
        z = self._drive(p.wo_a, xcat, xinfo)
        decode_step.wo_b_in(z, p.qblock, p.spec_wob, xcat, xinfo)
        att = self._drive(p.wo_b, xcat, xinfo)
        X2 = np.empty(X.shape, F32)
        decode_step.residual_out(att, X, post, comb, X2, p.spec_hc_ffn, xcat, xinfo)
        # MoE: x = rmsnorm(hc_pre(X2)); route; experts; residual
        mix = self._drive(p.hc_ffn, xcat, xinfo).reshape(1, -1)
        decode_step.ffn_in(X2, mix, w.hc_ffn.base, w.hc_ffn.scale, *hc, p.norms[2], p.spec_gate, x, post, comb,
                           xcat, xinfo)
        logits = self._drive(p.gate, xcat, xinfo).reshape(1, -1)
        k = cfg.n_activated_experts
        hidx = np.zeros((0, k), np.int64) if f.tid2eid is None else _hash_experts(f, ids, k)
        idx, wts = np.empty((1, k), np.int64), np.empty((1, k), F32)
        moe_glue.route_rows(logits, p.bias, hidx, k, F32(cfg.route_scale), idx, wts)
        limit, shared_limit = self._limits(cfg)
        y = self._moe_compiled(x, idx, wts, f, self._moe_plan(f), limit, shared_limit, p.moe_out)
        if y is None:
            y = self._moe_decode(x, idx, wts, f, limit, shared_limit)
        X3 = np.empty(X.shape, F32)
        decode_step.residual_out(y, X2, post, comb, X3, _NO_SPEC, xcat, xinfo)
        return X3
