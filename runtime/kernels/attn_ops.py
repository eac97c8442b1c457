"""The fast backend's `attend`: one token's attention in one compiled call (attn_step.py)
where it applies, else the reference's sequence of (fast) operations. A mixin.

The compiled step covers decode (S = 1) in the model's default numerics with the KV stores
of kv_cache.py (Fp8KVStore window ring and compressed KV, Fp4KeyStore indexer keys). Exact
mode, the initial revision (bf16 KV) and chunks of several tokens take the reference path.
"""
from __future__ import annotations

import numba
import numpy as np

from ..config import INDEX_FP4_BLOCK, KV_FP8_BLOCK
from ..kv_cache import Fp4KeyStore, Fp8KVStore
from ..nn import F32
from . import attn_step
from .aligned import aligned_empty

_E1 = np.empty(0, F32)


def writable_f32(x) -> np.ndarray:
    """A contiguous, writable float32 array of x's values (a copy of read-only mapped
    weights: one argument type for every layer, so the compiled step is compiled once)."""
    a = np.ascontiguousarray(x, dtype=F32)
    return a if a.flags.writeable else a.copy()


def _flat(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=F32).reshape(-1)


class _Plan:
    """What one layer's step needs besides the token's values, built on first use."""

    def __init__(self, cfg, layer, w, rope):
        m = cfg.ratio(layer)
        self.ratio = m
        self.freqs = writable_f32(rope.freqs)
        self.sink = writable_f32(w.sink).reshape(-1)
        self.kv_norm = writable_f32(w.kv_norm)
        c = w.compressor
        self.comp_w = ((writable_f32(c.norm), writable_f32(c.ape)) if c is not None
                       else (_E1, np.zeros((0, 1), F32)))
        ix = w.indexer
        if ix is not None:
            self.index_w = (writable_f32(ix.compressor.norm), writable_f32(ix.compressor.ape))
            self.wscale = F32(cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
        else:
            self.index_w = (_E1, np.zeros((0, 1), F32))
            self.wscale = F32(0)
        # empty stand-ins for the parts a layer kind lacks (one argument type for all layers)
        self.no_store = (np.zeros((0, 1), np.uint8), np.zeros((0, 1), np.int8), np.zeros((0, 1), np.uint16))
        self.no_state = tuple(np.zeros((0, 1), F32) for _ in range(4))
        self.no_index = (_E1, _E1, np.zeros((0, 1), np.uint8), np.zeros((0, 1), np.int8))
        ok_comp = c is None or (c.ratio == m and c.overlap == (m == 4) and c.head_dim == cfg.head_dim)
        ok_index = ix is None or (m == 4 and ix.compressor.ratio == 4 and ix.compressor.overlap)
        self.ok = ok_comp and ok_index and cfg.nope_dim + cfg.rope_dim == cfg.head_dim


class AttnOps:
    """Needs `self.num`, `self.compiled_attention` (False: always the reference path) and
    RefBackend.attend."""

    def _attn_plan(self, cfg, layer, w, rope):
        plans = self.__dict__.setdefault("_attn_plans", {})
        plan = plans.get(id(w))
        if plan is None or plan.w is not w:
            plan = plans[id(w)] = _Plan(cfg, layer, w, rope)
            plan.w = w
        return plan

    def _attn_buffer(self, name: str, shape: tuple) -> np.ndarray:
        """An aligned float32 buffer of at least shape[0] rows of shape[1:], reused across
        layers and tokens (fresh pages cost page faults)."""
        bufs = self.__dict__.setdefault("_attn_bufs", {})
        buf, tail = bufs.get(name), tuple(shape[1:])
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != tail:
            grown = 2 * buf.shape[0] if buf is not None and buf.shape[1:] == tail else 0
            buf = bufs[name] = aligned_empty((max(shape[0], grown),) + tail)
        return buf

    def _compiled_attend(self, lc, S: int) -> bool:
        """Whether the compiled step applies to S tokens with the layer cache lc."""
        num = self.num
        if num.exact or not num.kv_fp8_sim or S != 1:
            return False
        stores = [lc.ring] + ([lc.comp] if lc.comp is not None else [])
        if not all(isinstance(s, Fp8KVStore) and s.block == KV_FP8_BLOCK for s in stores):
            return False
        keys = lc.index_keys
        return keys is None or (isinstance(keys, Fp4KeyStore) and keys.block == INDEX_FP4_BLOCK)

    def _step_fixed(self, cfg, plan, w, lc) -> tuple:
        """attend_one's arguments that stay the same for one layer of one sequence (the
        cache's arrays are written in place), in its order from `window` to `q` without
        `nthreads` and `keys`: window, ratio, eps, scale, freqs, sink, kv_norm, comp_w, comp_st,
        indexer keys (packed, exps), index_w, index_st, wscale, topk, stores, q."""
        m, H, D = plan.ratio, cfg.n_heads, cfg.head_dim
        ring = lc.ring
        if m > 0:
            stores = (ring.codes, ring.exps, ring.rope, lc.comp.codes, lc.comp.exps, lc.comp.rope)
            st = lc.comp_state
            comp_st = (st.kv, st.score, st.prev_kv, st.prev_score)
        else:
            stores = (ring.codes, ring.exps, ring.rope) + plan.no_store
            comp_st = plan.no_state
        if w.indexer is not None:
            keys = lc.index_keys
            ikeys = (keys.packed, keys.exps)
            ist = lc.index_state
            index_st = (ist.kv, ist.score, ist.prev_kv, ist.prev_score)
        else:
            ikeys = plan.no_index[2:]
            index_st = plan.no_state
        q = self._attn_buffer("q", (1, H, D))
        return (cfg.window, m, cfg.norm_eps, cfg.head_dim ** -0.5, plan.freqs, plan.sink, plan.kv_norm, plan.comp_w,
                comp_st, ikeys, plan.index_w, index_st, plan.wscale, cfg.index_topk, stores, q)

    def _step_keys(self, cfg, plan, p0) -> np.ndarray:
        """The buffer for the keys token p0 attends to (window plus selected entries)."""
        m = plan.ratio
        n_sel = 0 if m == 0 else cfg.index_topk if m == 4 else (p0 + 1) // m
        return self._attn_buffer("keys", (cfg.window + n_sel, cfg.head_dim))

    def _step(self, cfg, plan, w, lc, p0, out=None):
        """attend_one's arguments besides the token's vectors (see attn_step.attend_one_for), in
        its order: p, window, ratio, eps, scale, nthreads, freqs, sink, kv_norm, comp_w, comp_st,
        indexer keys (packed, exps), index_w, index_st, wscale, topk, stores, keys, q, out.
        out: a [1, H, D] float32 result buffer, 64-byte aligned (default: a fresh one)."""
        window, m, eps, scale, *mid, stores, q = self._step_fixed(cfg, plan, w, lc)
        out = aligned_empty((1, cfg.n_heads, cfg.head_dim)) if out is None else out
        return (int(p0), window, m, eps, scale, numba.get_num_threads(), *mid, stores,
                self._step_keys(cfg, plan, p0), q, out)

    def attend(self, cfg, layer, w, lc, p0, qs, proj, rope):
        plan = self._attn_plan(cfg, layer, w, rope)
        if not (self.compiled_attention and plan.ok and self._compiled_attend(lc, qs[0].shape[0])):
            return super().attend(cfg, layer, w, lc, p0, qs, proj, rope)
        (p, window, m, eps, scale, nthreads, freqs, sink, kv_norm, comp_w, comp_st, ikeys, index_w, index_st, wscale,
         topk, stores, keys, q, out) = self._step(cfg, plan, w, lc, p0)
        u, g = (_flat(proj[1]), _flat(proj[2])) if m > 0 else (_E1, _E1)
        if w.indexer is not None:
            xqi, xw, index = _flat(qs[1]), _flat(proj[3]), (_flat(proj[4]), _flat(proj[5])) + ikeys
        else:
            xqi = xw = _E1
            index = plan.no_index
        n_comp = attn_step.attend_one_for(self.k.variant)(
            p, window, m, eps, scale, nthreads, freqs, sink, kv_norm, _flat(qs[0]), _flat(proj[0]), (u, g), comp_w,
            comp_st, xqi, xw, index, index_w, index_st, wscale, topk, stores, keys, q, out)
        if m > 0:
            lc.n_comp = n_comp
        return out
