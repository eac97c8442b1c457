"""Decode attention split over the keys (runtime/kernels/attn_decode.py, ir_attn.py)
against float64 references."""
import functools

import numba
import numpy as np
import pytest
from numba import njit

from dsv4.quant.formats import bf16_round
from dsv4.runtime.kernels import attn, attn_decode, cpu

VARIANTS = [v for v in cpu.VARIANTS if not cpu.unmet(v, cpu.host_features())]
IR_VARIANTS = [v for v in VARIANTS if v != "numba"]


def reference(q, keys, sink, scale):
    """float64 softmax with a sink over all keys (spec 5.4.7)."""
    x = (q.astype(np.float64) @ keys.T.astype(np.float64)) * np.float64(scale)
    M = np.maximum(x.max(1, initial=-np.inf), sink)
    e = np.exp(x - M[:, None])
    return (e @ keys.astype(np.float64)) / (e.sum(1) + np.exp(sink - M))[:, None]


def attend(variant, q, keys, sink, scale, nthreads, out):
    """attend_keys of `variant` without the rotation."""
    none = np.empty(0, np.float32)
    attn_decode.attend_keys(variant)(q, keys, sink, scale, nthreads, out, none, none, False)


def case(rng, H, D, n, spread=1.0):
    q = attn.aligned_empty((H, D))
    q[:] = bf16_round(rng.standard_normal((H, D)).astype(np.float32))
    keys = attn.aligned_empty((n, D))
    keys[:] = bf16_round((rng.standard_normal((n, D)) * np.exp(rng.uniform(-spread, spread, (n, 1))))
                         .astype(np.float32))
    sink = rng.standard_normal(H).astype(np.float32)
    return q, keys, sink


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,D,n", [(64, 512, 640), (64, 512, 129), (7, 40, 131), (5, 37, 3), (3, 16, 1),
                                   (12, 100, 300), (9, 24, 257), (4, 64, 0)])
def test_attend_keys_matches_reference(rng, variant, H, D, n):
    q, keys, sink = case(rng, H, D, n)
    scale = np.float32(D ** -0.5)
    out = attn.aligned_empty((H, D))
    attend(variant, q, keys, sink, scale, numba.get_num_threads(), out)
    if n == 0:
        assert not out.any()
        return
    np.testing.assert_allclose(out, reference(q, keys, sink, scale), rtol=0, atol=2e-6 * np.abs(keys).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_attend_keys_same_bits_for_any_thread_count(rng, variant):
    """How the heads of a part are split over threads changes nothing; the parts depend on
    the number of keys only."""
    q, keys, sink = case(rng, 64, 512, 300, spread=3.0)
    outs = []
    for nthreads in (1, 2, 3, 5, 16):
        out = attn.aligned_empty((64, 512))
        attend(variant, q, keys, sink, np.float32(0.05), nthreads, out)
        outs.append(out.view(np.uint32).copy())
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_parts_and_head_split():
    assert [attn_decode.n_parts(n) for n in (1, 128, 129, 640, 8320)] == [1, 1, 2, 5, 65]
    assert attn_decode.head_split(5, 64, 2) == 2          # 10 items: 5 per thread
    assert attn_decode.head_split(5, 64, 1) == 1
    assert attn_decode.head_split(1, 64, 16) == 16        # blocks of 4 heads
    assert attn_decode.head_split(1, 6, 4) == 1           # blocks would go below 4 heads


def test_large_scores_do_not_overflow(rng):
    """Scores of ~1e3 in one part and ~-1e3 in another: each part's own maximum keeps its
    exponentials finite, the combination rescales them."""
    H, D, n = 4, 32, 300
    q, keys, sink = case(rng, H, D, n)
    keys[:150] *= 60
    keys[150:] *= -60
    out = attn.aligned_empty((H, D))
    attend(VARIANTS[0], q, keys, sink, np.float32(1.0), 2, out)
    want = reference(q, keys, sink, 1.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4 * np.abs(keys).max())


@functools.cache
def _ir_caller(variant, which):
    """attn_decode.products of `variant` for all rows of a / c (the decode path's calls)."""
    VARIANT, WHICH = variant, which          # noqa: N806 - compile-time constants

    def call(a, k, c):
        attn_decode.products(VARIANT, WHICH, a, k, c, 0, a.shape[0] if WHICH == "scores" else c.shape[0])
    return njit(call)


@pytest.mark.parametrize("variant", IR_VARIANTS)
@pytest.mark.parametrize("nh,nk,D", [(4, 4, 16), (5, 7, 37), (1, 1, 1), (9, 130, 72), (64, 128, 512), (3, 5, 100)])
def test_ir_products_on_strided_rows(rng, variant, nh, nk, D):
    """scores: s = q k^T; wsum: o = p k; rows of every operand a few floats longer than
    used; nothing outside the used elements is written."""
    q = rng.standard_normal((nh, D + 3)).astype(np.float32)[:, :D]
    k = rng.standard_normal((nk, D + 5)).astype(np.float32)[:, :D]
    s_buf = np.full((nh, nk + 2), 7.0, np.float32)
    _ir_caller(variant, "scores")(q, k, s_buf[:, :nk])
    np.testing.assert_allclose(s_buf[:, :nk], q.astype(np.float64) @ k.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    assert (s_buf[:, nk:] == 7.0).all()
    p = rng.random((nh, nk + 1)).astype(np.float32)[:, :nk]
    o_buf = np.full((nh, D + 4), 7.0, np.float32)
    _ir_caller(variant, "wsum")(p, k, o_buf[:, :D])
    np.testing.assert_allclose(o_buf[:, :D], p.astype(np.float64) @ k.astype(np.float64), rtol=1e-5, atol=1e-4)
    assert (o_buf[:, D:] == 7.0).all()


def test_sparse_attn_single_query_uses_the_decode_kernel(rng):
    """attn.sparse_attn with a variant and one query gathers the valid keys (in idx order,
    duplicates twice) and gives attend_keys' bits."""
    H, D, T = 8, 64, 90
    q, kv, sink = case(rng, H, D, T)
    idx = np.concatenate([rng.permutation(T)[:50], [-1, 3, 3, -1]])[None, :]
    got = attn.sparse_attn(q[None], kv, idx, sink, 0.125, variant=VARIANTS[0])
    keys = attn.aligned_empty((52, D))
    keys[:] = kv[idx[0][idx[0] >= 0]]
    want = attn.aligned_empty((H, D))
    attend(VARIANTS[0], q, keys, sink, np.float32(0.125), numba.get_num_threads(), want)
    assert np.array_equal(got[0].view(np.uint32), want.view(np.uint32))
