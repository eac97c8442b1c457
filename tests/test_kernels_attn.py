"""Attention-side Numba kernels against the NumPy reference (runtime/kernels/attn.py)."""
import numpy as np
import pytest

from dsv4.quant.blocks import q4, q8
from dsv4.quant.formats import bf16_round
from dsv4.runtime.attention.indexer import select
from dsv4.runtime.backend import RefBackend
from dsv4.runtime.kernels import attn, cpu
from dsv4.runtime.kv_cache import Bf16Store, F32Store, Fp4KeyStore, Fp8KVStore
from dsv4.runtime.nn import topk_desc
from dsv4.runtime.numerics import Numerics

VARIANTS = [v for v in cpu.VARIANTS if not cpu.unmet(v, cpu.host_features())]
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


SPECIAL = np.array([0.0, -0.0, 1e-45, -3e-42, 2.0 ** -130, 1e-30, 448.0, -1000.0, 3e38,
                    -np.inf, np.inf, np.nan, -np.nan], np.float32)


def kv_rows(rng, n, D, grid, lead):
    """x f32[n, D]: random values over a wide range; rows 0..n/2 with SPECIAL values mixed
    in; row 0 starts with a whole-zero block, row 1 % n has one NaN in its first block,
    row 2 (n > 2) is `lead` then midpoints of `grid` (round-to-even ties) times 2^-3..2^3."""
    x = rng.standard_normal((n, D)) * np.exp2(rng.integers(-40, 40, (n, 1)))
    x = x.astype(np.float32)
    mask = rng.random((n, D)) < 0.1
    mask[n // 2:] = False
    x[mask] = rng.choice(SPECIAL, mask.sum())
    x[0, :64] = 0.0
    x[1 % n, 1:64] = np.abs(x[1 % n, 1:64])
    x[1 % n, 5] = np.nan
    if n > 2:
        mids = (grid[1:] + grid[:-1]) / 2
        x[2] = np.resize(mids * np.exp2(rng.integers(-3, 4, mids.size)), D)
        x[2, ::32] = lead
    return x


def same_arrays(a, b):
    """Every array attribute of two stores, byte for byte."""
    for name, v in vars(a).items():
        if isinstance(v, np.ndarray):
            w = getattr(b, name)
            assert v.dtype == w.dtype and v.shape == w.shape, name
            bad = np.argwhere(v.view(np.uint8) != w.view(np.uint8))
            assert bad.size == 0, f"{name}: {bad.shape[0]} bytes differ, first at {bad[0]}"


def check_write(make, rng, x, rows):
    """write_kv into one store, store.write into an identical one (random prior content)."""
    want, got = make(), make()
    for name, v in vars(want).items():
        if isinstance(v, np.ndarray):
            v.view(np.uint8)[...] = rng.integers(0, 256, v.nbytes, np.uint8).reshape(
                v.view(np.uint8).shape)
            getattr(got, name)[...] = v
    with np.errstate(all="ignore"):
        want.write(rows, x)
        attn.write_kv(got, rows, x)
    same_arrays(want, got)
    return got


E4M3_GRID = np.array([m * 2.0 ** -9 for m in range(8)] +
                     [(1 + m / 8) * 2.0 ** e for e in range(-6, 9) for m in range(8)],
                     np.float32)[:-1]                               # 0 .. 448
E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def row_forms(rng, R, n):
    """rows as a slice, a strided slice, and an int array of distinct random rows."""
    return [slice(3, 3 + n), slice(R - 1, R - 1 - 2 * n, -2),
            rng.permutation(R)[:n]]


@pytest.mark.parametrize("D,Rd,n", [(512, 64, 1), (512, 64, 70), (200, 8, 5), (80, 16, 3),
                                    (200, 8, 66)])
def test_write_kv_fp8_bit_exact(rng, D, Rd, n):
    R = 2 * n + 7
    x = kv_rows(rng, n, D, E4M3_GRID, 448.0)
    for rows in row_forms(rng, R, n):
        st = check_write(lambda: Fp8KVStore(R, D, Rd), rng, x, rows)
    r0, r1 = rows[0], rows[1 % n]
    assert n == 1 or st.exps[r0, 0] == -22 and not st.codes[r0, :64].any()  # zeros: floor
    assert st.exps[r1, 0] == 0 and st.codes[r1, 5] == 0x7F                   # NaN: k = 0
    want = Fp8KVStore(R, D, Rd)
    with np.errstate(all="ignore"):
        REF.write_kv(want, rows, x)                       # the reference seam is store.write
    assert np.array_equal(want.codes[rows], st.codes[rows])


@pytest.mark.parametrize("Id,n", [(128, 1), (64, 4), (128, 65)])
def test_write_kv_fp4_bit_exact(rng, Id, n):
    R = 2 * n + 5
    x = kv_rows(rng, n, Id, E2M1_GRID, 6.0)
    for rows in row_forms(rng, R, n):
        check_write(lambda: Fp4KeyStore(R, Id), rng, x, rows)
    x = q4(x[n // 2:], 32)                                # FP4-rounded keys (the model's)
    check_write(lambda: Fp4KeyStore(R, Id), rng, x, np.arange(x.shape[0]) + 1)


@pytest.mark.parametrize("D,n", [(80, 1), (200, 9), (96, 64)])
def test_write_kv_bf16_and_f32(rng, D, n):
    R = 2 * n + 3
    x = kv_rows(rng, n, D, E2M1_GRID, 6.0)
    for rows in row_forms(rng, R, n):
        check_write(lambda: Bf16Store(R, D), rng, x, rows)
        check_write(lambda: F32Store(R, D), rng, x, rows)


def test_write_kv_checks(rng):
    st = Fp8KVStore(9, 80, 16)
    with pytest.raises(ValueError, match="expected shape"):
        attn.write_kv(st, np.array([1, 2]), np.zeros((3, 80), np.float32))
    with pytest.raises(ValueError, match="expected shape"):
        attn.write_kv(st, slice(0, 2), np.zeros((2, 64), np.float32))
    with pytest.raises(IndexError):
        attn.write_kv(st, np.array([9]), np.zeros((1, 80), np.float32))
    with pytest.raises(ValueError, match="key store"):
        attn.write_kv(Fp4KeyStore(4, 48), [0], np.zeros((1, 48), np.float32))
    attn.write_kv(st, slice(0, 0), np.zeros((0, 80), np.float32))   # no rows: no-op

    class Other:                                          # unknown store: its own write
        def write(self, rows, x):
            self.got = (rows, x)
    o = Other()
    attn.write_kv(o, [2], "x")
    assert o.got == ([2], "x")


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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("S,Ih,Id,T", [(1, 3, 64, 1), (2, 3, 64, 130), (1, 64, 128, 300),
                                       (9, 5, 128, 257), (3, 2, 32, 0)])
def test_index_scores_fp4_bit_exact(rng, S, Ih, Id, T, variant):
    qi, wt, st = fp4_case(rng, S, Ih, Id, T)
    want = REF.index_scores(qi, wt, st, T)
    got = attn.index_scores(qi, wt, st, T, round_bf16=True, variant=variant)
    assert got.shape == (S, T)
    assert np.array_equal(bits(got), bits(want))


@pytest.mark.parametrize("variant", VARIANTS)
def test_index_scores_exact_mode_f32_keys(rng, variant):
    S, Ih, Id, T = 3, 5, 96, 200
    qi = rng.standard_normal((S, Ih, Id)).astype(np.float32)
    wt = rng.standard_normal((S, Ih)).astype(np.float32)
    st = F32Store(T + 1, Id)
    st.write(slice(0, T), rng.standard_normal((T, Id)).astype(np.float32))
    want = REF_EXACT.index_scores(qi, wt, st, T)
    got = attn.index_scores(qi, wt, st, T, round_bf16=False, variant=variant)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-5 * scale
    # keys given as float32 with the FP4-rounded values: the float path is bit-exact too
    qi4, wt4, st4 = fp4_case(rng, S, Ih, 128, T)
    keys = st4.read(slice(0, T))
    f = F32Store(T, 128)
    f.write(slice(0, T), keys)
    got4 = attn.index_scores_f32(qi4, wt4, f.data, T, round_bf16=True, variant=variant)
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
