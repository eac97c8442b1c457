"""Attention-side Numba kernels against the NumPy reference (runtime/kernels/attn.py)."""
import numpy as np
import pytest

from dsv4.quant.blocks import q4, q8
from dsv4.quant.formats import bf16_round
from dsv4.runtime.attention.indexer import select
from dsv4.runtime.backend import RefBackend
from dsv4.runtime.kernels import attn
from dsv4.runtime.kv_cache import Bf16Store, F32Store, Fp4KeyStore, Fp8KVStore
from dsv4.runtime.nn import topk_desc
from dsv4.runtime.numerics import Numerics

REF = RefBackend(Numerics())
REF_EXACT = RefBackend(Numerics(exact=True))


def bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


# ------------------------------------------------------------------ KV rows
@pytest.mark.parametrize("D,Rd", [(80, 16), (200, 64), (512, 64)])
def test_read_kv_fp8_bit_exact(rng, D, Rd):
    R = 37
    st = Fp8KVStore(R, D, Rd)
    x = rng.standard_normal((R, D)) * np.exp(rng.uniform(-12, 12, (R, 1)))
    x[3] = 0.0
    x[4, : D - Rd] = 1e-30                                    # tiny block: floor exponent
    x = bf16_round(x.astype(np.float32))
    x[:, : D - Rd] = q8(x[:, : D - Rd], 64)
    st.write(np.arange(R), x)
    # every code, extreme exponents, subnormal e4m3 codes, NaN codes 0x7F / 0xFF
    n = D - Rd
    st.codes[5] = np.arange(n) % 256
    st.codes[6] = 255 - np.arange(n) % 256
    st.exps[5] = np.linspace(-128, 127, st.exps.shape[1]).astype(np.int8)
    st.exps[6] = np.int8(8)
    st.rope[7] = rng.integers(0, 1 << 16, Rd, dtype=np.uint16)
    rows = np.concatenate([np.arange(R), rng.integers(0, R, 50), [0, 0]])
    with np.errstate(over="ignore"):
        want = st.read(rows)
    got = attn.read_kv_fp8(st.codes, st.exps, st.rope, rows, st.block)
    assert np.array_equal(bits(got), bits(want))
    assert np.array_equal(bits(attn.read_kv(st, rows[:9])), bits(want[:9]))
    assert attn.read_kv(st, np.zeros(0, np.int64)).shape == (0, D)
    buf = attn.aligned_empty((12, D))                            # into a slice of a buffer
    assert buf.ctypes.data % 64 == 0
    attn.read_kv(st, rows[:9], out=buf[2:11])
    assert np.array_equal(bits(buf[2:11]), bits(want[:9]))


def test_read_kv_bf16_and_f32(rng):
    x = rng.standard_normal((9, 80)).astype(np.float32)
    b, f = Bf16Store(9, 80), F32Store(9, 80)
    b.write(np.arange(9), x)
    f.write(np.arange(9), x)
    rows = np.array([8, 0, 3, 3])
    assert np.array_equal(bits(attn.read_kv(b, rows)), bits(b.read(rows)))
    assert np.array_equal(bits(attn.read_kv(f, rows)), bits(f.read(rows)))
    assert np.array_equal(attn.read_kv(f, slice(2, 5)), f.read(slice(2, 5)))
    with pytest.raises(IndexError):
        attn.read_kv(f, np.array([9]))


# ------------------------------------------------------------------ sparse attention
def check_attn(q, kv, idx, sink, scale, tol=2e-6, **kw):
    want = REF.sparse_attn(q, kv, idx, sink, scale)
    got = attn.sparse_attn(q, kv, idx, sink, scale, **kw)
    ref_scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / ref_scale
    assert err < tol, err
    return got


@pytest.mark.parametrize("S,H,D,T,K", [(1, 3, 80, 1, 1), (5, 3, 80, 11, 7), (3, 4, 64, 40, 33),
                                       (2, 7, 96, 9, 13)])
def test_sparse_attn_odd_shapes(rng, S, H, D, T, K):
    q = rng.standard_normal((S, H, D)).astype(np.float32)
    kv = rng.standard_normal((T, D)).astype(np.float32)
    idx = rng.integers(-1, T, (S, K))                        # -1 holes and duplicates
    idx[0, 0] = 0                                             # at least one valid key
    sink = rng.standard_normal(H).astype(np.float32)
    for hb in (None, 1, 2, H):
        check_attn(q, kv, idx, sink, D ** -0.5, heads_per_item=hb)


def test_sparse_attn_edge_rows(rng):
    S, H, D, T = 4, 3, 80, 6
    q = rng.standard_normal((S, H, D)).astype(np.float32) * 4
    kv = rng.standard_normal((T, D)).astype(np.float32)
    idx = np.full((S, 5), -1)
    idx[1, 3] = 4                                             # one valid key
    idx[2] = [5, 5, 5, -1, 5]                                 # the same key three times
    idx[3] = [0, 1, 2, 3, 4]
    sink = np.array([-30.0, 0.0, 30.0], np.float32)           # sink from nothing to all
    with np.errstate(over="ignore"):                          # reference, row without keys
        got = check_attn(q, kv, idx, sink, 1.0)
    assert np.all(got[0] == 0.0)                              # no valid key -> zeros
    x = q[1].astype(np.float64) @ kv[4].astype(np.float64)    # one key: weight 1/(1+e^(s-x))
    w = 1.0 / (1.0 + np.exp(sink.astype(np.float64) - x))
    np.testing.assert_allclose(got[1], w[:, None] * kv[4][None, :], rtol=1e-5, atol=1e-30)
    assert attn.sparse_attn(q, kv, np.zeros((S, 0), np.int64), sink, 1.0).shape == (S, H, D)


def test_sparse_attn_large_dynamic_range(rng):
    S, H, D, T, K = 3, 4, 64, 50, 40
    q = rng.standard_normal((S, H, D)).astype(np.float32) * 30
    kv = (rng.standard_normal((T, D)) * np.exp(rng.uniform(-4, 4, (T, 1)))).astype(np.float32)
    idx = np.stack([rng.permutation(T)[:K] for _ in range(S)])
    sink = (rng.standard_normal(H) * 50).astype(np.float32)
    # scores up to ~1e4: the reference itself rounds them to float32 (ulp ~1e-3)
    check_attn(q, kv, idx, sink, 1.0, tol=2e-3)
    check_attn(q, kv, idx, sink, 0.01, tol=2e-5)


def test_sparse_attn_flash_decode_dims(rng):
    H, D, T, K = 64, 512, 700, 640
    q = bf16_round(rng.standard_normal((1, H, D)).astype(np.float32))
    kv = bf16_round(rng.standard_normal((T, D)).astype(np.float32))
    idx = rng.permutation(T)[:K][None, :].copy()
    idx[0, -5:] = -1
    sink = rng.standard_normal(H).astype(np.float32)
    check_attn(q, kv, idx, sink, D ** -0.5)


# ------------------------------------------------------------------ indexer scores
def fp4_case(rng, S, Ih, Id, T, rows=None):
    qi = q4(bf16_round(rng.standard_normal((S, Ih, Id)).astype(np.float32)) * 3)
    wt = bf16_round((rng.standard_normal((S, Ih)) * 0.05).astype(np.float32))
    st = Fp4KeyStore(rows or T + 3, Id)
    k = rng.standard_normal((T, Id)) * np.exp(rng.uniform(-3, 3, (T, Id // 32))).repeat(32, 1)
    st.write(slice(0, T), q4(k.astype(np.float32)))
    return qi, wt, st


@pytest.mark.parametrize("S,Ih,Id,T", [(1, 3, 64, 1), (2, 3, 64, 130), (1, 64, 128, 300),
                                       (9, 5, 128, 257), (3, 2, 32, 0)])
def test_index_scores_fp4_bit_exact(rng, S, Ih, Id, T):
    qi, wt, st = fp4_case(rng, S, Ih, Id, T)
    want = REF.index_scores(qi, wt, st, T)
    got = attn.index_scores(qi, wt, st, T, round_bf16=True)
    assert got.shape == (S, T)
    assert np.array_equal(bits(got), bits(want))


def test_index_scores_exact_mode_f32_keys(rng):
    S, Ih, Id, T = 3, 5, 96, 200
    qi = rng.standard_normal((S, Ih, Id)).astype(np.float32)
    wt = rng.standard_normal((S, Ih)).astype(np.float32)
    st = F32Store(T + 1, Id)
    st.write(slice(0, T), rng.standard_normal((T, Id)).astype(np.float32))
    want = REF_EXACT.index_scores(qi, wt, st, T)
    got = attn.index_scores(qi, wt, st, T, round_bf16=False)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-5 * scale
    # keys given as float32 with the FP4-rounded values: the float path is bit-exact too
    qi4, wt4, st4 = fp4_case(rng, S, Ih, 128, T)
    keys = st4.read(slice(0, T))
    f = F32Store(T, 128)
    f.write(slice(0, T), keys)
    got4 = attn.index_scores_f32(qi4, wt4, f.data, T, round_bf16=True)
    assert np.array_equal(bits(got4), bits(REF.index_scores(qi4, wt4, st4, T)))


def test_index_scores_round_bf16_unrounded_inputs(rng):
    """Float inputs that are not FP4-rounded: float32 block sums may round where the
    reference's float64 dot does not, so a bf16 rounding can flip; rare and by 1 bf16 ulp."""
    S, Ih, Id, T = 2, 16, 128, 400
    qi = rng.standard_normal((S, Ih, Id)).astype(np.float32)
    wt = bf16_round(rng.standard_normal((S, Ih)).astype(np.float32))
    st = F32Store(T, Id)
    st.write(slice(0, T), rng.standard_normal((T, Id)).astype(np.float32))
    want = REF.index_scores(qi, wt, st, T)
    got = attn.index_scores(qi, wt, st, T, round_bf16=True)
    diff = got != want
    assert diff.mean() < 0.02
    ulp = np.abs(bits(got).astype(np.int64) - bits(want).astype(np.int64)) >> 16
    assert ulp.max() <= 2


# ------------------------------------------------------------------ top-k
def assert_same_set(got, want):
    assert np.array_equal(np.sort(got), np.sort(want))
    assert np.all(np.diff(got) > 0)                              # ascending index order


@pytest.mark.parametrize("kind", ["normal", "ties", "bf16", "special", "range", "const"])
def test_topk_indices_same_set(rng, kind):
    for _ in range(60):
        T, k = int(rng.integers(0, 400)), int(rng.integers(0, 420))
        if kind == "normal":
            x = rng.standard_normal(T)
        elif kind == "ties":
            x = rng.integers(-3, 3, T).astype(float)
        elif kind == "bf16":
            x = bf16_round(rng.standard_normal(T).astype(np.float32))
        elif kind == "special":
            x = rng.choice([np.nan, -np.inf, np.inf, 0.0, -0.0, 1.0, -1e-45, 3e38], T)
        elif kind == "range":
            x = rng.standard_normal(T) * np.exp(rng.uniform(-80, 80, T))
        else:
            x = np.full(T, -2.5)
        x = x.astype(np.float32)
        got = attn.topk_indices(x, k)
        assert got.dtype == np.int64 and got.size == min(k, T)
        assert_same_set(got, topk_desc(x, k))


def test_topk_large_bf16(rng):
    x = bf16_round(rng.standard_normal(300_000).astype(np.float32))
    assert_same_set(attn.topk_indices(x, 512), topk_desc(x, 512))


@pytest.mark.parametrize("ratio", [1, 4, 128])
def test_select_rows_matches_indexer_select(rng, ratio):
    for trial in range(40):
        S, T, k = int(rng.integers(1, 12)), int(rng.integers(0, 90)), int(rng.integers(1, 30))
        x = rng.standard_normal((S, T))
        if trial % 3 == 1:
            x = np.round(x)                                       # many ties
        if trial % 3 == 2:
            x[rng.random((S, T)) < 0.2] = np.nan                  # NaN: invisible rows can win
            x[rng.random((S, T)) < 0.2] = -np.inf
        x = x.astype(np.float32)
        pos = np.sort(rng.integers(0, T * ratio + 8, S))
        want = select(x, pos, ratio, k)
        got = attn.select_rows(x, pos, ratio, k)
        assert got.shape == want.shape
        for g, w in zip(got, want):
            assert_same_set(g[g >= 0], w[w >= 0])
            assert np.all(g[(g >= 0).sum():] == -1)
