"""One decoded token's block in ONE compiled call (the fast backend's default for decode).

decode_ops.py runs a block as ~15 calls from Python: nine gemv regions, the compiled
stages between them (decode_step.py), the attention step (attn_step.py) and the MoE step
(moe_step.py). `layer_step(isa)` makes the same calls, with the same arguments and in the
same order, from compiled code, so the result is bit-identical (tests compare them) and most
of the Python between the calls (~7 ms per token on the benchmark model) is gone. Its
constant arguments come in two Packs (pack.py), built once per layer and once per layer
of a sequence, so what is left per layer call is a handful of arguments and one dispatch.

The gemv driver is a parallel Numba function made per kernel variant (gemv._driver);
`drive_region` resolves to it at compile time from the variant's name, so the compiled
block holds no Python object and is cached on disk like the driver. Numba checks only
this file's time stamp for the cache, while the block links the code of every kernel
module it calls: the digest of their sources (sources.py) is a closure constant of the
compiled function, which keys its cache, so an edit anywhere in the kernels compiles it anew.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import overload

from . import attn_step, decode_step, gemv, moe_glue, moe_step, sources

F32 = np.float32
OK, MOE_FALLBACK = 0, 1           # layer_step's status: done; the MoE needs the general path


def drive_region(isa, table, mats, xsel, xp, xinfo, out):
    """The gemv driver of kernel variant `isa` (a string constant) on `table` = (addresses,
    dimensions, prepared-x lengths, unit bytes, thread count): out[...] = the jobs'
    results (see gemv._driver); returns out."""
    raise NotImplementedError("drive_region is only callable from Numba-compiled code")


@overload(drive_region, prefer_literal=True)
def _drive_region(isa, table, mats, xsel, xp, xinfo, out):
    if not isinstance(isa, types.StringLiteral):
        raise TypingError("drive_region: isa must be a string constant")
    drive = gemv._driver(isa.literal_value)

    def impl(isa, table, mats, xsel, xp, xinfo, out):
        addr, dims, xlen, unit_bytes, nthreads = table
        return drive(addr, dims, xlen, mats, xsel, xp, xinfo, unit_bytes, nthreads, out)
    return impl


@functools.cache
def layer_step(isa: str):
    """The compiled block for kernel variant `isa` ('avx512' or 'avx2'), cached on disk."""
    ISA, DIGEST = isa, sources.digest()          # compile-time constants

    def step(X, p, nthreads, keys, hidx, X3, layer, seq):
        """X [1, hc, d] -> X3 [1, hc, d] (written) at position p. layer: a Pack of the
        layer's constants (decode_ops._fused_parts): the gemv table, the x rows and their
        info, sites (the seven regions of decode_ops' plan as (matrix rows, x rows, part
        offsets, result) in the order hc mix, projections of x, query projections, wo_a,
        wo_b, hc mix, router), specs (the x layouts: hc mix, quantized x, raw x, query
        latent, wo_a, wo_b, hc mix, router, none), hcp (hyper-connection and norm
        constants), whether it has an indexer, the MoE step's constants, the work buffers
        (x, post, comb, X2, idx, wts) and attention's output buffer; seq: a Pack of
        attend_one's arguments fixed for this layer of this sequence (AttnOps._step_fixed);
        nthreads, keys: the attention's threads and the buffer for its keys; hidx: a
        hash layer's expert ids [1, k] (else [0, k]).
        -> (compressed entries written so far, OK or MOE_FALLBACK: then x, X2, post, comb,
        idx and wts hold what the general MoE path and the last residual need)."""
        assert DIGEST != ""
        table, xcat, xinfo, sites, specs, hcp, has_index, moe, work, o = layer.args
        (window, ratio, a_eps, scale, freqs, sink, kv_norm, comp_w, comp_st, ikeys, index_w, index_st, wscale, topk,
         stores, qbuf) = seq.args
        hc_attn, proj, qs, wo_a, wo_b, hc_ffn, gate = sites
        s_hca, s_q, s_raw, s_qr, s_woa, s_wob, s_hcf, s_gate, s_none = specs
        base_a, scale_a, base_f, scale_f, iters, hc_eps, eps, n_attn, n_q, n_ffn, qblock, G = hcp
        x, post, comb, X2, idx, wts = work

        # attention: x = rmsnorm(hc_pre(X)), projections of x and of the query latent
        decode_step.mix_in(X, s_hca, xcat, xinfo)
        mix = drive_region(ISA, table, hc_attn[0], hc_attn[1], xcat, xinfo, hc_attn[3]).reshape(1, -1)
        decode_step.block_in(X, mix, base_a, scale_a, iters, hc_eps, eps, n_attn, qblock, s_q, s_raw,
                             x, post, comb, xcat, xinfo)
        pr, po = drive_region(ISA, table, proj[0], proj[1], xcat, xinfo, proj[3]), proj[2]
        decode_step.query_in(pr[po[0]:po[1]], n_q, eps, qblock, s_qr, xcat, xinfo)
        qy, qo = drive_region(ISA, table, qs[0], qs[1], xcat, xinfo, qs[3]), qs[2]

        # attend: proj parts 1 wkv, 2-3 compressor, 4-6 indexer; query parts 0 wq_b, 1 indexer
        none = pr[0:0]
        u = pr[po[2]:po[3]] if ratio > 0 else none
        g = pr[po[3]:po[4]] if ratio > 0 else none
        xqi = qy[qo[1]:qo[2]] if has_index else none
        xw = pr[po[4]:po[5]] if has_index else none
        iu = pr[po[5]:po[6]] if has_index else none
        ig = pr[po[6]:po[7]] if has_index else none
        n_comp = attn_step.attend_one_into(ISA, p, window, ratio, a_eps, scale, nthreads, freqs, sink, kv_norm,
                                           qy[qo[0]:qo[1]], pr[po[1]:po[2]], (u, g), comp_w, comp_st, xqi, xw,
                                           (iu, ig, ikeys[0], ikeys[1]), index_w, index_st, wscale, topk,
                                           stores, keys, qbuf, o)                   # o [1, H, D]

        # output projection, residual, then x = rmsnorm(hc_pre(X2)) and the router
        decode_step.groups_in(o, G, s_woa, xcat, xinfo)
        z = drive_region(ISA, table, wo_a[0], wo_a[1], xcat, xinfo, wo_a[3])
        decode_step.wo_b_in(z, qblock, s_wob, xcat, xinfo)
        a = drive_region(ISA, table, wo_b[0], wo_b[1], xcat, xinfo, wo_b[3])
        decode_step.residual_out(a, X, post, comb, X2, s_hcf, xcat, xinfo)
        mix = drive_region(ISA, table, hc_ffn[0], hc_ffn[1], xcat, xinfo, hc_ffn[3]).reshape(1, -1)
        decode_step.ffn_in(X2, mix, base_f, scale_f, iters, hc_eps, eps, n_ffn, s_gate, x, post, comb,
                           xcat, xinfo)
        logits = drive_region(ISA, table, gate[0], gate[1], xcat, xinfo, gate[3]).reshape(1, -1)

        # MoE: route, w1/w3 of the routed and shared experts, SwiGLU, w2, sum, residual
        (bias, k, route_scale, m1, m3, ms1, ms3, m2, ms2, sblock, lay_d, lay_i, inter, limit, shared_limit,
         w2_block, rnd, gu, yb) = moe
        moe_glue.route_rows(logits, bias, hidx, k, route_scale, idx, wts)
        ok, xp, info, mats, xsel = moe_step.stage1(x, idx, m1, m3, ms1, ms3, sblock, *lay_d)
        if not ok:
            return n_comp, MOE_FALLBACK
        drive_region(ISA, table, mats, xsel, xp, info, gu)
        ok, xp, info, mats, xsel = moe_step.stage2(gu, idx, wts, m2, ms2, inter, limit, shared_limit, w2_block,
                                                   rnd, *lay_i)
        if not ok:
            return n_comp, MOE_FALLBACK
        drive_region(ISA, table, mats, xsel, xp, info, yb)
        y = np.empty(x.shape, F32)
        moe_step.stage3(yb, idx, rnd, y)
        decode_step.residual_out(y, X2, post, comb, X3, s_none, xcat, xinfo)
        return n_comp, OK
    # one name per variant (see gemv._driver on same-named cached closures)
    step.__name__ = step.__qualname__ = f"decode_layer_{isa}"
    return njit(cache=True, boundscheck=False, nogil=True)(step)
