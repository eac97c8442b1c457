"""Compiled stages of one decoded token's block (S = 1), between its gemv regions.

decode_ops.py runs a block as: gemv region, stage, gemv region, stage, ... Each stage does
the small operations of block.py / attention.py / moe.py that lie between two matmuls,
with the fused kernels the fast backend calls one by one on that path (glue.py, actq.py)
in the same order, and prepares the next region's x rows exactly as prep.prepare does
(`prep_row`). So the block's result is bit-identical to the per-operation path (tests
compare them), with ~15 calls per block from Python instead of ~60.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .actq import quant_row
from .glue import bf16_inplace, hc_post_rows_serial, hc_pre_rows, rmsnorm_rows
from .prep_nb import bf16_exact_rows, bf16_gather_rows, gather_rows, terms_rows

F32 = np.float32
_OPTS = {"cache": True, "boundscheck": False, "error_model": "numpy", "nogil": True}


@njit(**_OPTS)
def prep_row(x, spec, xrow, info):
    """prep.prepare of one row x [1, K] for one table format, into xrow (float32) with
    info = (nterms, floats used, format index). spec = (format index, mode, slot index,
    alternative slot index, words per plane chunk, x scale): mode 0 float32 as is, 1 the
    avx512 bf16 planes (1 plane when x is bf16-exact, else 3; the bf16 format instead
    takes the float layout `alt`), 2 a float gather times the scale."""
    code, mode, idx, alt, per, scale = spec
    K = x.shape[1]
    if mode == 0:
        xrow[:K] = x[0]
        info[0], info[1], info[2] = 1, K, code
        return
    if mode == 1:
        exact = bf16_exact_rows(x)
        if code == 2 and not exact:
            gather_rows(x, alt, F32(1.0), xrow[:alt.size].reshape(1, -1))
            info[0], info[1], info[2] = 0, alt.size, code
            return
        nt = 1 if exact else 3
        w16 = xrow[:idx.size * nt // 2].view(np.uint16).reshape(1, -1)
        if exact:
            bf16_gather_rows(x, idx, w16)
        else:
            terms_rows(x, idx, per, nt, w16)
        info[0], info[1], info[2] = nt, idx.size * nt // 2, code
        return
    gather_rows(x, idx, scale, xrow[:idx.size].reshape(1, -1))
    info[0], info[1], info[2] = 1, idx.size, code


@njit(**_OPTS)
def mix_in(X, spec, xcat, xinfo):
    """The hyper-connection mix's input: X [1, hc, d] flattened, prepared for `fn`."""
    prep_row(X.reshape(1, -1), spec, xcat[0], xinfo[0])


@njit(**_OPTS)
def block_in(X, mix, base, scale, iters, hc_eps, eps, norm, qblock, qspec, pspec,
             x_out, post, comb, xcat, xinfo):
    """hc_pre + rmsnorm, then the x rows of the block's first region: row 0 the e4m3
    values of x for the quantized matrices (qspec), row 1 x itself for the raw ones
    (pspec; unused when the region has none). x_out [1, d] gets the normed x."""
    d = X.shape[2]
    xm = np.empty((1, d), F32)
    hc_pre_rows(X, mix, base, scale, iters, hc_eps, eps, True, xm, post, comb)
    rmsnorm_rows(xm, norm, eps, False, True, x_out)
    xq = np.empty((1, d), F32)
    quant_row(x_out[0], xq[0], qblock)
    prep_row(xq, qspec, xcat[0], xinfo[0])
    if pspec[0] >= 0:
        prep_row(x_out, pspec, xcat[1], xinfo[1])


@njit(**_OPTS)
def query_in(xq_a, norm, eps, qblock, spec, xcat, xinfo):
    """qr = rmsnorm(x wq_a^T) (input rounded), quantized and prepared for wq_b."""
    qr = np.empty((1, xq_a.shape[0]), F32)
    rmsnorm_rows(xq_a.reshape(1, -1), norm, eps, True, True, qr)
    quant_row(qr[0], qr[0], qblock)
    prep_row(qr, spec, xcat[0], xinfo[0])


@njit(**_OPTS)
def groups_in(o, G, spec, xcat, xinfo):
    """o [1, H, D] as G rows of H*D/G (wo_a's groups), each prepared for wo_a."""
    og = o.reshape(G, -1)
    for g in range(G):
        prep_row(og[g:g + 1], spec, xcat[g], xinfo[g])


@njit(**_OPTS)
def wo_b_in(z, qblock, spec, xcat, xinfo):
    """z = bf16(wo_a output) [G*Lo], quantized and prepared for wo_b."""
    zz = z.reshape(1, -1).copy()
    bf16_inplace(zz.reshape(-1))
    quant_row(zz[0], zz[0], qblock)
    prep_row(zz, spec, xcat[0], xinfo[0])


@njit(**_OPTS)
def residual_out(a, X, post, comb, X_out, spec, xcat, xinfo):
    """X_out = hc_post(bf16(a), X) and, when spec is given (format index >= 0), X_out
    prepared for the next mix."""
    aa = a.reshape(1, -1).copy()
    bf16_inplace(aa.reshape(-1))
    hc_post_rows_serial(aa, X, post, comb, True, X_out)
    if spec[0] >= 0:
        prep_row(X_out.reshape(1, -1), spec, xcat[0], xinfo[0])


@njit(**_OPTS)
def ffn_in(X, mix, base, scale, iters, hc_eps, eps, norm, spec, x_out, post, comb, xcat, xinfo):
    """hc_pre + rmsnorm before the MoE, x prepared for the router's gate."""
    xm = np.empty((1, X.shape[2]), F32)
    hc_pre_rows(X, mix, base, scale, iters, hc_eps, eps, True, xm, post, comb)
    rmsnorm_rows(xm, norm, eps, False, True, x_out)
    prep_row(x_out, spec, xcat[0], xinfo[0])
