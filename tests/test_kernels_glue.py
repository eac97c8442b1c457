"""The fused small operations of the fast backend against the reference ones."""
import numpy as np
import pytest
from numba import njit

from dsv4.runtime.backend import RefBackend
from dsv4.runtime.hc import HcParams
from dsv4.runtime.kernels.backend import FastBackend
from dsv4.runtime.kernels.glue import sumsq
from dsv4.runtime.numerics import Numerics
from dsv4.runtime.rope import Rope, yarn_freqs


@pytest.fixture(params=[False, True], ids=["default", "exact"])
def pair(request):
    num = Numerics(exact=request.param)
    return RefBackend(num), FastBackend(num)


def close(a, b, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_hyper_connections(pair, rng):
    ref, fast = pair
    S, hc, d = 3, 4, 40
    X = ref.num.bf16(rng.standard_normal((S, hc, d)).astype(np.float32))
    p = HcParams((rng.standard_normal((24, hc * d)) * 0.1).astype(np.float32),
                 rng.standard_normal(24).astype(np.float32), np.float32([0.7, 1.1, 0.9]))
    for a, b in zip(ref.hc_pre(X, p, hc, 20, 1e-6, 1e-6), fast.hc_pre(X, p, hc, 20, 1e-6, 1e-6)):
        close(a, b, rtol=1e-2 if not ref.num.exact else 2e-6, atol=1e-2 if not ref.num.exact else 1e-6)
    x, post, comb = ref.hc_pre(X, p, hc, 20, 1e-6, 1e-6)
    a = ref.num.bf16(rng.standard_normal((S, d)).astype(np.float32))
    close(ref.hc_post(a, X, post, comb), fast.hc_post(a, X, post, comb), rtol=1e-2, atol=1e-2)
    ph = HcParams(p.fn[:4], p.base[:4], np.float32([0.5]))
    close(ref.hc_head(X, ph, 1e-6, 1e-6), fast.hc_head(X, ph, 1e-6, 1e-6), rtol=1e-2, atol=1e-2)


def test_norms_rope_hadamard_bit_exact_in_default_mode(pair, rng):
    ref, fast = pair
    x = (rng.standard_normal((5, 3, 128)) * 3).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(128)).astype(np.float32)
    exact = ref.num.exact
    cmp = close if exact else (lambda a, b: np.testing.assert_array_equal(a, b))
    cmp(ref.rmsnorm(x, w, 1e-6, round_input=True), fast.rmsnorm(x, w, 1e-6, round_input=True))
    cmp(ref.head_norm(x, 1e-6), fast.head_norm(x, 1e-6))
    rope = Rope(yarn_freqs(64, 160000.0, 64, 16.0, 32, 1))
    pos = np.array([0, 3, 17, 1000, 65535])
    for inv in (False, True):
        cmp(ref.rope(x, pos, rope, inv), fast.rope(x, pos, rope, inv))
    cmp(ref.hadamard(x), fast.hadamard(x))


def test_quant_round_trips_bit_exact(pair, rng):
    ref, fast = pair
    x = (rng.standard_normal((7, 96)) * np.exp(rng.uniform(-9, 9, (7, 1)))).astype(np.float32)
    x[0, :5] = [0.25, 0.75, 2.5, 5.0, -3.5]
    np.testing.assert_array_equal(ref.kv_fp8(x, 64), fast.kv_fp8(x, 64))
    np.testing.assert_array_equal(ref.fp4(x, 32), fast.fp4(x, 32))


def test_numba_x_preparation_matches_numpy_layouts(rng):
    from dsv4.quant.blocks import act_quant_values
    from dsv4.runtime.kernels import prep
    for variant in ("avx512", "avx2", "numba"):
        for fmt in ("fp4", "fp8", "bf16", "f32"):
            for K in (32, 96, 200, 2048):
                if fmt == "fp4" and K % 32:
                    continue
                for quantized in (True, False):
                    x = (rng.standard_normal((2, K)) * np.exp(rng.uniform(-5, 5, (2, 1))))
                    x = x.astype(np.float32)
                    if quantized:
                        x = act_quant_values(x)
                    a, na = prep.prepare(variant, fmt, x, 128)
                    b, nb = prep.prepare_numpy(variant, fmt, x, 128)
                    assert na == nb and np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
                        (variant, fmt, K, quantized)


def test_dequant_rows_exact_including_extreme_scales(rng):
    from dsv4.runtime.kernels.dequant import dequant_rows
    from dsv4.runtime.linear import LinearW
    w8 = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    w8[(w8 & 0x7F) == 0x7F] = 0
    s8 = rng.integers(0, 255, (3, 2), dtype=np.uint8)
    w4 = rng.integers(0, 256, (70, 48), dtype=np.uint8)
    s4 = rng.integers(0, 255, (70, 3), dtype=np.uint8)
    w8[3, 5], w8[4, 7] = 0x7F, 0xFF                             # NaN codes (the IR loop selects NaN)
    for lin in (LinearW("a", "fp8", w8, s8, 300, 200), LinearW("b", "fp4", w4, s4, 70, 96),
                LinearW("c", "fp8", np.ascontiguousarray(w8[:, :197]), s8, 300, 197, (128, 100))):  # tails
        out = np.empty((lin.out_features, lin.in_features), np.float32)
        with np.errstate(over="ignore"):
            want = lin.dequant()
        for use_ir in (False, True):
            for r0 in (0, 64):
                n = min(64, lin.out_features - r0)
                got = dequant_rows(lin, r0, n, out, use_ir=use_ir)
                np.testing.assert_array_equal(got, want[r0:r0 + n])      # NaN == NaN, -0 == +0
                if lin.fmt == "fp8":                                     # FP8: every bit
                    assert np.array_equal(got.view(np.uint32), want[r0:r0 + n].view(np.uint32))


def test_dequant_rows_ir_nontemporal_and_strided(rng):
    """Outputs past NT_BYTES (non-temporal stores) and a strided output both match."""
    from dsv4.runtime.kernels import dequant
    from dsv4.runtime.kernels.aligned import aligned_empty
    from dsv4.runtime.linear import LinearW
    O, K = 2048, 1024
    w8 = rng.integers(0, 0x7F, (O, K), dtype=np.uint8)
    lin8 = LinearW("a", "fp8", w8, rng.integers(100, 150, (O // 128, K // 128), dtype=np.uint8), O, K)
    lin4 = LinearW("b", "fp4", rng.integers(0, 256, (O, K // 2), dtype=np.uint8),
                   rng.integers(100, 150, (O, K // 32), dtype=np.uint8), O, K)
    for lin in (lin8, lin4):
        want = lin.dequant()
        out = aligned_empty((O, K))
        assert out.nbytes >= dequant.NT_BYTES and dequant._nontemporal(out, lin.block if lin.fmt == "fp8" else (1, 32))
        np.testing.assert_array_equal(dequant.dequant_rows(lin, 0, O, out, use_ir=True), want)
        wide = np.full((40, K + 8), 3.0, np.float32)                     # rows 4 floats apart from K
        got = dequant.dequant_rows(lin, 128, 40, wide[:, :K], use_ir=True)
        np.testing.assert_array_equal(got, want[128:168])
        assert np.all(wide[:, K:] == 3.0)


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("S", [1, 3])
def test_decode_moe_step_matches_reference(odd_dir, exact, S):
    """The fused decode MoE step (gemv regions + moe_glue kernels) against RefBackend on a
    real layer (odd model: swiglu_limit 0.5, so the clamps act), routed and shared."""
    from dsv4.runtime.model import Model
    from dsv4.runtime.moe import route
    num = Numerics(exact=exact)
    ref, fast = Model.load(odd_dir, num, backend="ref"), Model.load(odd_dir, num, backend="fast")
    rng = np.random.default_rng(S)
    cfg = ref.cfg
    for layer in (0, cfg.n_layers - 1):                         # a hash layer and a scored one
        wr, wf = ref.w.blocks[layer].ffn, fast.w.blocks[layer].ffn
        x = ref.be.bf16((rng.standard_normal((S, cfg.dim)) * 2).astype(np.float32))
        idx, wts = route(cfg, wr, x, rng.integers(0, cfg.vocab_size, S), ref.be)
        a = ref.be.moe_experts(x, idx, wts, wr, cfg.swiglu_limit, cfg.swiglu_limit)
        b = fast.be.moe_experts(x, idx, wts, wf, cfg.swiglu_limit, cfg.swiglu_limit)
        assert b.shape == a.shape and b.dtype == np.float32
        if exact:
            close(a, b, rtol=1e-5, atol=1e-5)
        else:      # float32 vs float64 sums may flip a bf16 or FP8 rounding of a few elements
            err = np.abs(a - b) / (np.abs(a) + 1e-2)
            assert np.median(err) < 1e-3 and np.mean(err > 0.05) < 0.02, (np.median(err), np.mean(err > 0.05))


def test_swiglu_and_combine_kernels(rng):
    """moe_glue against the NumPy formulas of RefBackend.expert / moe_experts (the sum
    bit-exact, SwiGLU to float32 rounding of its silu)."""
    from dsv4.quant.blocks import act_quant_values
    from dsv4.quant.formats import bf16_round
    from dsv4.runtime.kernels import moe_glue
    from dsv4.runtime.nn import silu
    n, inter = 5, 200                                       # 200: a short last FP8 block
    gu = (rng.standard_normal(2 * n * inter) * 3).astype(np.float32)
    goff, uoff = np.arange(n) * inter, (n + np.arange(n)) * inter
    lim = np.float32([0.5, 0.0, 2.0, 7.0, 0.0])
    wt = np.float32([0.3, 1.7, 0.01, 1.0, 1.0])
    for rnd in (True, False):
        r = bf16_round if rnd else (lambda v: v)
        g, u = r(gu[:n * inter].reshape(n, inter)), r(gu[n * inter:].reshape(n, inter))
        want = []
        for j in range(n):
            gj, uj = g[j], u[j]
            if lim[j] > 0:
                uj, gj = np.clip(uj, -lim[j], lim[j]), np.minimum(gj, lim[j])
            want.append(r((silu(gj) * uj) * wt[j]))
        want = np.stack(want).astype(np.float32)
        for qb in (0, 128):
            got = np.empty((n, inter), np.float32)
            moe_glue.swiglu_rows(gu, goff, uoff, inter, lim, wt, rnd, qb, got)
            ref = act_quant_values(want, qb) if qb else want
            if not rnd and not qb:            # float32 silu within a few ulp of the float64 one
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)
            else:                             # ... which may flip a rare bf16 / e4m3 rounding
                assert np.mean(got != ref) < 0.01
                np.testing.assert_allclose(got, ref, rtol=0.13, atol=1e-30)
        S, d = 2, 7
        y = rng.standard_normal(5 * d).astype(np.float32)
        order = np.array([[1, 0], [3, 2]])
        out = np.empty((S, d), np.float32)
        moe_glue.combine_rows(y, np.arange(5) * d, order, np.array([4, 4]), rnd, out)
        yy = r(y.reshape(5, d))
        want = np.stack([(np.float32(0) + yy[1] + yy[0]) + yy[4], (np.float32(0) + yy[3] + yy[2]) + yy[4]])
        np.testing.assert_array_equal(out, want)


def test_router_kernel_matches_reference(rng):
    """FastBackend.route (Numba) against moe.select_experts: ids and weights bit-identical,
    ties to the lower id, hash layers, large logits (softplus threshold), bad hash ids."""
    from dsv4.runtime.moe import select_experts
    fast = FastBackend(Numerics.from_revision("current"))
    S, E, k = 5, 37, 6
    logits = (rng.standard_normal((S, E)) * 4).astype(np.float32)
    logits[0, :8] = 25.0                                  # above the softplus threshold, tied
    logits[1, 3] = logits[1, 30] = 9.0                    # a tie at the top
    bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
    hashed = rng.integers(0, E, (S, k))
    for b, h in ((bias, None), (np.zeros(E, np.float32), None), (bias, hashed)):
        want = select_experts(logits, b, h, k, "sqrtsoftplus", 2.5)
        got = fast.route(logits, b, h, k, "sqrtsoftplus", 2.5)
        assert np.array_equal(got[0], want[0])
        assert np.array_equal(got[1].view(np.uint32), want[1].view(np.uint32))
    for func in ("sigmoid", "softmax"):                   # other score functions: the reference
        np.testing.assert_array_equal(fast.route(logits, bias, None, k, func, 1.0)[0],
                                      select_experts(logits, bias, None, k, func, 1.0)[0])
    with pytest.raises(ValueError, match="hash expert ids"):
        fast.route(logits, bias, np.full((S, k), E), k, "sqrtsoftplus", 1.0)


@njit
def _sumsq_both(v, strided, rnd):
    return sumsq(v, rnd), sumsq(strided, rnd)


@pytest.mark.parametrize("n", [0, 5, 8, 13, 512, 4099])
def test_sumsq_vector_lanes_match_the_defined_order(n, rng):
    """sumsq's vector path (contiguous v) and its scalar path (strided v) both equal the
    defined order: lane l sums the squares of elements j = l (mod 8) below n - n % 8 in
    float64, the tail goes to lane 0, then ((0+1)+(2+3))+((4+5)+(6+7))."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    if n > 8:
        x[::7] = 0.0
        x[3] = np.float32(1e-42)                    # subnormal
        x[5] = np.float32(3e38)                     # squares overflow float32, not float64
    strided = np.zeros(2 * n, np.float32)[::2]
    strided[:] = x
    for rnd in (False, True):
        vals = Numerics().bf16(x) if rnd else x
        s = [0.0] * 8
        n8 = n - n % 8
        for j in range(n8):
            s[j % 8] += float(vals[j]) ** 2
        for j in range(n8, n):
            s[0] += float(vals[j]) ** 2
        want = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
        got, got_strided = _sumsq_both(x, strided, rnd)
        assert got == want and got_strided == want, (rnd, got, got_strided, want)
