"""Each operation against an independent formula or a hand-computed case."""
import math

import numpy as np
import pytest

from dsv4.runtime.attention import compressor as comp
from dsv4.runtime.attention.attention import window_index
from dsv4.runtime.attention.indexer import select
from dsv4.runtime.backend import RefBackend
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.hc import HcParams, hc_head, hc_post, hc_pre, sinkhorn
from dsv4.runtime.kv_cache import CompressorState, F32Store
from dsv4.runtime.nn import hadamard_matrix, hadamard_rotate, softplus, topk_desc
from dsv4.runtime.numerics import Numerics
from dsv4.runtime.params import CompressorW
from dsv4.runtime.presets import preset_config
from dsv4.runtime.rope import Rope, yarn_freqs

EXACT = Numerics(exact=True)


def test_rope_matches_complex_multiplication(rng):
    freqs = yarn_freqs(64, 10000.0, 0, 1.0, 0, 0)
    rope = Rope(freqs)
    x = rng.standard_normal((5, 3, 128)).astype(np.float32)
    pos = np.array([0, 1, 7, 1000, 65535])
    y = rope.apply(x, pos)
    z = x[..., 64:].astype(np.float64).reshape(5, 3, 32, 2)
    zc = z[..., 0] + 1j * z[..., 1]
    ang = (pos[:, None].astype(np.float32) * freqs[None, :]).astype(np.float64)
    want = zc * np.exp(1j * ang)[:, None, :]
    got = y[..., 64:].reshape(5, 3, 32, 2)
    np.testing.assert_allclose(got[..., 0], want.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., 1], want.imag, rtol=1e-5, atol=1e-5)
    assert np.array_equal(y[..., :64], x[..., :64])           # nope dims untouched
    back = rope.apply(y, pos, inverse=True)
    np.testing.assert_allclose(back, x, atol=1e-4)


def test_yarn_ramp_for_official_values():
    base = yarn_freqs(64, 160000.0, 0, 1.0, 0, 0)
    f = yarn_freqs(64, 160000.0, 65536, 16.0, 32, 1)
    # pairs 0..15 keep their frequency, pairs >= 25 are divided by 16 (spec 4.5)
    np.testing.assert_array_equal(f[:16], base[:16])
    np.testing.assert_allclose(f[25:], base[25:] / 16, rtol=1e-6)
    ramp = (np.arange(16, 25) - 15) / 10.0
    np.testing.assert_allclose(f[16:25], base[16:25] / 16 * ramp + base[16:25] * (1 - ramp),
                               rtol=1e-6)


def test_rope_choice_per_layer():
    cfg = ModelConfig.from_hf(preset_config("flash"))
    assert np.array_equal(Rope.for_layer(cfg, 0).freqs, yarn_freqs(64, 10000.0, 0, 1, 0, 0))
    assert Rope.for_layer(cfg, 2).freqs[-1] == pytest.approx(
        yarn_freqs(64, 160000.0, 0, 1, 0, 0)[-1] / 16, rel=1e-6)


def test_sinkhorn_rows_and_columns(rng):
    c = rng.standard_normal((6, 4, 4)).astype(np.float32) * 3
    s = sinkhorn(c, 20, 1e-6)
    np.testing.assert_allclose(s.sum(axis=-2), 1, atol=1e-5)   # columns exactly normalised last
    np.testing.assert_allclose(s.sum(axis=-1), 1, atol=5e-2)   # rows: converging
    np.testing.assert_allclose(sinkhorn(c, 2000, 1e-6).sum(axis=-1), 1, atol=1e-4)
    one = sinkhorn(c, 1, 0.0)                                   # softmax rows, then columns
    e = np.exp(c - c.max(-1, keepdims=True))
    e = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(one, e / e.sum(-2, keepdims=True), rtol=1e-5)


def test_hc_post_uses_columns_and_hc_pre_weights(rng):
    S, hc, d = 3, 4, 8
    X = rng.standard_normal((S, hc, d)).astype(np.float32)
    a = rng.standard_normal((S, d)).astype(np.float32)
    post = rng.random((S, hc)).astype(np.float32)
    comb = rng.random((S, hc, hc)).astype(np.float32)
    y = hc_post(a, X, post, comb, EXACT)
    for s in range(S):
        for k in range(hc):
            want = post[s, k] * a[s] + sum(comb[s, j, k] * X[s, j] for j in range(hc))
            np.testing.assert_allclose(y[s, k], want, rtol=1e-5, atol=1e-6)
    p = HcParams(rng.standard_normal((24, hc * d)).astype(np.float32) * 0.1,
                 rng.standard_normal(24).astype(np.float32), np.array([1, 1, 1], np.float32))
    x, post2, comb2 = hc_pre(X, p, hc, 20, 1e-6, 1e-6, EXACT, RefBackend(EXACT))
    z = X.reshape(S, -1).astype(np.float64)
    mix = (z @ p.fn.T.astype(np.float64)) / np.sqrt((z ** 2).mean(-1, keepdims=True) + 1e-6)
    pre = 1 / (1 + np.exp(-(mix[:, :4] + p.base[:4]))) + 1e-6
    np.testing.assert_allclose(x, np.einsum("sh,shd->sd", pre, X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(post2, 2 / (1 + np.exp(-(mix[:, 4:8] + p.base[4:8]))), rtol=1e-5)
    ph = HcParams(p.fn[:4], p.base[:4], np.array([0.5], np.float32))
    w = 1 / (1 + np.exp(-(mix[:, :4] * 0.5 + p.base[:4]))) + 1e-6
    np.testing.assert_allclose(hc_head(X, ph, 1e-6, 1e-6, EXACT, RefBackend(EXACT)), np.einsum("sh,shd->sd", w, X),
                               rtol=1e-5, atol=1e-6)


def test_hadamard_is_orthonormal_sylvester(rng):
    h = hadamard_matrix(8)
    assert np.array_equal(h[1], [1, -1, 1, -1, 1, -1, 1, -1])
    np.testing.assert_allclose(h @ h.T, 8 * np.eye(8))
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(hadamard_rotate(x), axis=1),
                               np.linalg.norm(x, axis=1), rtol=1e-5)


def test_softplus_threshold_and_topk_ties():
    np.testing.assert_allclose(softplus(np.float32([0.0, 1.0, 25.0])),
                               [math.log(2), math.log1p(math.e), 25.0], rtol=1e-6)
    assert list(topk_desc(np.array([1.0, 3.0, 3.0, 0.0, 3.0]), 2)) == [1, 2]


def _compressor(rng, m, dc, d=16):
    c = 2 if m == 4 else 1
    return CompressorW(ape=rng.standard_normal((m, c * dc)).astype(np.float32),
                       wkv=rng.standard_normal((c * dc, d)).astype(np.float32),
                       wgate=rng.standard_normal((c * dc, d)).astype(np.float32),
                       norm=np.ones(dc, np.float32), ratio=m, overlap=m == 4, head_dim=dc)


def _direct_pool(w, x, b):
    """Entry b computed straight from the definition (per channel softmax over the block)."""
    m, dc = w.ratio, w.head_dim
    u = x.astype(np.float64) @ w.wkv.T
    g = x.astype(np.float64) @ w.wgate.T + w.ape[np.arange(len(x)) % m]
    if not w.overlap:
        rows = slice(b * m, b * m + m)
        p = np.exp(g[rows] - g[rows].max(0))
        return (p * u[rows]).sum(0) / p.sum(0)
    vals, logits = [], []
    if b > 0:
        vals.append(u[(b - 1) * m:b * m, :dc])
        logits.append(g[(b - 1) * m:b * m, :dc])
    vals.append(u[b * m:b * m + m, dc:])
    logits.append(g[b * m:b * m + m, dc:])
    v, lg = np.concatenate(vals), np.concatenate(logits)
    p = np.exp(lg - lg.max(0))
    return (p * v).sum(0) / p.sum(0)


@pytest.mark.parametrize("m", [4, 8, 128])
def test_compressor_matches_direct_blocks_for_any_chunking(rng, m):
    w = _compressor(rng, m, dc=8)
    S = 3 * m + m // 2 + 1
    x = rng.standard_normal((S, 16)).astype(np.float32)
    st = CompressorState(m, w.ape.shape[1], w.overlap)
    u, g = x @ w.wkv.T, x @ w.wgate.T

    def feed(state, a, b):
        return comp.advance(w, state, u[a:b], g[a:b], a)
    first, one_shot = feed(st, 0, S)
    assert first == 0 and one_shot.shape[0] == S // m
    for b in range(S // m):
        np.testing.assert_allclose(one_shot[b], _direct_pool(w, x, b), rtol=1e-5, atol=1e-6)
    # the same entries from uneven chunks (decode-like steps included)
    st2, got, p = CompressorState(m, w.ape.shape[1], w.overlap), [], 0
    for size in [1, m - 1, 2, 1, m + 3, S]:
        size = min(size, S - p)
        if size <= 0:
            break
        f, e = feed(st2, p, p + size)
        assert f == p // m
        got.append(e)
        p += size
    np.testing.assert_allclose(np.concatenate(got), one_shot, rtol=1e-6, atol=1e-7)


def test_indexer_visibility_at_block_edges():
    scores = np.arange(6, dtype=np.float32)[None, :].repeat(10, 0)    # later entries score higher
    pos = np.arange(10, 20)                                           # positions 10..19
    sel = select(scores, pos, 4, 3)
    for p, row in zip(pos, sel):
        visible = (p + 1) // 4                                        # entries t < (p+1)//4
        want = sorted(range(visible), reverse=True)[:3]
        assert sorted(t for t in row if t >= 0) == sorted(want), (p, row)
    # position 11 completes block 2: entry 2 becomes visible exactly there
    assert 2 not in sel[0] and 2 in sel[1]
    # fewer visible entries than top-k: surplus selections are -1
    assert list(select(scores[:1, :6], np.array([4]), 4, 3)[0]) == [0, -1, -1]


def test_window_index_wraps_and_clips():
    idx = window_index(np.array([0, 1, 5]), 0, 4)
    assert idx.tolist() == [[-1, -1, -1, 0], [-1, -1, 0, 1], [2, 3, 4, 5]]
    # keys start at position 3 (ring holds 3..5), queries at 6, 7
    assert window_index(np.array([6, 7]), 3, 4).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]


def test_sparse_attention_with_sink_against_formula(rng):
    be = RefBackend(EXACT)
    q = rng.standard_normal((2, 3, 16)).astype(np.float32)
    kv = rng.standard_normal((5, 16)).astype(np.float32)
    idx = np.array([[0, 2, -1, 4], [1, -1, -1, -1]])
    sink = np.array([0.5, -1.0, 2.0], np.float32)
    o = be.sparse_attn(q, kv, idx, sink, 0.25)
    for s in range(2):
        keys = kv[[i for i in idx[s] if i >= 0]].astype(np.float64)
        for h in range(3):
            sc = 0.25 * keys @ q[s, h]
            e = np.exp(sc)
            want = (e[:, None] * keys).sum(0) / (e.sum() + np.exp(sink[h]))
            np.testing.assert_allclose(o[s, h], want, rtol=1e-5, atol=1e-6)


def test_index_scores_relu_weighted_sum(rng):
    be = RefBackend(EXACT)
    qi = rng.standard_normal((2, 3, 8)).astype(np.float32)
    wt = rng.standard_normal((2, 3)).astype(np.float32)
    keys = rng.standard_normal((4, 8)).astype(np.float32)
    store = F32Store(6, 8)
    store.write(slice(0, 4), keys)
    got = be.index_scores(qi, wt, store, 4)
    for s in range(2):
        for t in range(4):
            want = sum(wt[s, h] * max(0.0, float(qi[s, h] @ keys[t])) for h in range(3))
            assert got[s, t] == pytest.approx(want, rel=1e-5, abs=1e-6)
