"""The fused small operations of the fast backend against the reference ones."""
import numpy as np
import pytest

from dsv4.runtime.backend import RefBackend
from dsv4.runtime.hc import HcParams
from dsv4.runtime.kernels.backend import FastBackend
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
    for lin in (LinearW("a", "fp8", w8, s8, 300, 200), LinearW("b", "fp4", w4, s4, 70, 96)):
        out = np.empty((lin.out_features, lin.in_features), np.float32)
        with np.errstate(over="ignore"):
            want = lin.dequant()
        for r0 in (0, 64):
            n = min(64, lin.out_features - r0)
            got = dequant_rows(lin, r0, n, out)
            np.testing.assert_array_equal(got, want[r0:r0 + n])
