"""Sampling: greedy, temperature, top-k, top-p, distribution and determinism."""

import numpy as np
import pytest

from dsv4.runtime.errors import DsvError
from dsv4.runtime.sampler import SamplingParams, _nucleus, sample


def softmax64(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def draws(logits, params, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([sample(logits, params, rng) for _ in range(n)])


@pytest.fixture
def logits():
    return np.random.default_rng(3).normal(0.0, 2.0, size=1000).astype(np.float32)


def test_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 0, 1.0) and not p.greedy


def test_greedy_argmax_and_ties(logits):
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(temperature=0), rng) == int(np.argmax(logits))
    tied = np.zeros(50, np.float32)
    tied[[7, 3, 40]] = 5.0
    assert sample(tied, SamplingParams(temperature=0, top_k=10, top_p=0.5), rng) == 3


def test_greedy_consumes_no_randomness(logits):
    rng = np.random.default_rng(5)
    sample(logits, SamplingParams(temperature=0), rng)
    assert rng.random() == np.random.default_rng(5).random()


@pytest.mark.parametrize("temperature", [1e-4, 1e-300, 5e-324])
def test_temperature_to_zero_is_greedy(logits, temperature):
    got = draws(logits, SamplingParams(temperature=temperature), 50)
    assert (got == np.argmax(logits)).all()


def test_numpy_scalars_accepted(logits):
    params = SamplingParams(np.float32(0.5), np.int64(3), np.float32(0.9))
    assert sample(logits, params, np.random.default_rng(0)) in np.argsort(-logits)[:3]


def test_top_k_one_and_tiny_top_p_are_greedy(logits):
    top = int(np.argmax(logits))
    assert (draws(logits, SamplingParams(temperature=1.5, top_k=1), 50) == top).all()
    assert (draws(logits, SamplingParams(temperature=1.5, top_p=1e-9), 50) == top).all()
    assert (draws(logits, SamplingParams(temperature=1.5, top_k=20, top_p=1e-9), 50) == top).all()


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_distribution_matches_softmax():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])).astype(np.float32)
    logits += 3.0                                          # softmax is shift invariant
    n = 20000
    counts = np.bincount(draws(logits, SamplingParams(temperature=1.0), n, seed=11), minlength=7)
    # 6 degrees of freedom: P(chi2 > 22.46) = 0.001.
    assert _chi_square(counts, softmax64(logits)) < 22.46
    # A wrong temperature must be detected by the same test.
    counts_t2 = np.bincount(draws(logits, SamplingParams(temperature=2.0), n, seed=11),
                            minlength=7)
    assert _chi_square(counts_t2, softmax64(logits)) > 100
    assert _chi_square(counts_t2, softmax64(logits / 2.0)) < 22.46


def test_top_k_excludes_the_rest(logits):
    k = 5
    allowed = set(np.argsort(-logits)[:k].tolist())
    got = draws(logits, SamplingParams(temperature=3.0, top_k=k), 2000)
    assert set(got.tolist()) <= allowed
    assert len(set(got.tolist())) == k                    # high T: all k show up


def test_top_k_renormalised_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    n = 20000
    got = draws(logits, SamplingParams(temperature=1.0, top_k=3), n, seed=2)
    counts = np.bincount(got, minlength=5)
    assert counts[3:].sum() == 0
    assert _chi_square(counts[:3], softmax64(logits[:3])) < 13.82   # 2 dof, p = 0.001


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    # 0.5 < 0.7 <= 0.8: the nucleus is {0, 1}.
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 4000, seed=4)
    assert set(got.tolist()) == {0, 1}
    frac0 = (got == 0).mean()
    assert abs(frac0 - 0.5 / 0.8) < 0.03
    # Exactly reaching the threshold stops there (binary fractions: sums are exact).
    exact = np.array([0.125, 0.5, 0.125, 0.25])
    assert _nucleus(exact, 0.5).tolist() == [1]
    assert _nucleus(exact, 0.75).tolist() == [1, 3]
    assert _nucleus(exact, 0.76).tolist() == [1, 3, 0]    # ties: lower id first
    assert _nucleus(exact, 1.0).tolist() == [1, 3, 0, 2]
    # Combined with top-k, top-p applies to the renormalised top-k distribution.
    got = draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6), 2000, seed=8)
    assert set(got.tolist()) == {0}                       # 0.5/0.8 = 0.625 >= 0.6


def test_top_p_and_top_k_on_real_vocab_size():
    logits = np.random.default_rng(9).normal(size=129280).astype(np.float32)
    logits[[17, 100000, 129279]] += 16.0                  # three dominant tokens
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    got = set(draws(logits, params, 100).tolist())
    assert got <= {17, 100000, 129279} and len(got) == 3
    got = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.9), 100).tolist())
    assert got <= {17, 100000, 129279}


def reference_nucleus(probs, top_p):
    """Full sort, most probable first, ties by lower id."""
    order = np.lexsort((np.arange(probs.size), -probs))
    cum = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, probs.size)
    return order[:keep]


@pytest.mark.parametrize("shape", ["peaked", "flat", "tied", "tied_tail", "two_levels"])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_equals_full_sort(shape, top_p):
    rng = np.random.default_rng(21)
    n = 20000
    if shape == "peaked":
        z = rng.normal(size=n) * 4.0
    elif shape == "flat":
        z = rng.normal(size=n) * 0.1
    elif shape == "tied":
        z = np.zeros(n)
    elif shape == "tied_tail":                            # one big token, the rest equal
        z = np.zeros(n)
        z[n - 1] = np.log(0.45 / (0.55 / (n - 1)))
    else:                                                 # 300 high equal, rest low equal
        z = np.zeros(n)
        z[rng.choice(n, 300, replace=False)] = 6.0
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    np.testing.assert_array_equal(_nucleus(probs, top_p), reference_nucleus(probs, top_p))


def test_top_p_ties_prefer_lower_ids():
    n = 5000
    logits = np.zeros(n, np.float32)
    logits[n - 1] = np.log(0.45 / (0.55 / (n - 1)))        # p = 0.45, others tied
    probs = softmax64(logits)
    allowed = set(reference_nucleus(probs, 0.5).tolist())
    assert n - 1 in allowed and max(allowed - {n - 1}) < 1000
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.5), 400, seed=6)
    assert set(got.tolist()) <= allowed


def test_deterministic_under_seed(logits):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)
    a = draws(logits, params, 200, seed=123)
    b = draws(logits, params, 200, seed=123)
    c = draws(logits, params, 200, seed=124)
    assert (a == b).all() and not (a == c).all()


def test_minus_inf_logits_never_drawn():
    logits = np.full(10, -np.inf, np.float32)
    logits[[2, 6]] = [0.0, 1.0]
    assert set(draws(logits, SamplingParams(temperature=1.0), 500).tolist()) == {2, 6}


@pytest.mark.parametrize("kwargs,flag", [
    (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),
    (dict(temperature=float("inf")), "--temperature"),
    (dict(temperature="1"), "--temperature"),
    (dict(top_k=-1), "--top-k"),
    (dict(top_k=2.5), "--top-k"),
    (dict(top_k=True), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.01), "--top-p"),
    (dict(top_p=float("nan")), "--top-p"),
])
def test_invalid_params(kwargs, flag):
    with pytest.raises(DsvError, match=flag):
        SamplingParams(**kwargs)


def test_bad_logits():
    rng = np.random.default_rng(0)
    with pytest.raises(DsvError, match="NaN"):
        sample(np.array([0.0, np.nan], np.float32), SamplingParams(), rng)
    with pytest.raises(DsvError, match="finite"):
        sample(np.full(3, -np.inf, np.float32), SamplingParams(), rng)
    with pytest.raises(ValueError, match="1-D"):
        sample(np.zeros((2, 3), np.float32), SamplingParams(), rng)
