"""Next-token sampling: temperature, top-k, top-p (nucleus) over one row of logits.

Order of operations: logits / T, keep the k largest (top-k), renormalise, keep the smallest
set of most probable tokens whose probability sums to at least top_p (top-p), renormalise,
draw one token by inverting the cumulative distribution with a single uniform number.
T = 0 is greedy (argmax, lowest id on ties). The softmax is computed in float64.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np

from dsv4.runtime.errors import DsvError

NUCLEUS_FIRST_TRY = 1024   # top-p sorts this many candidates first (more only if needed)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6   # 0 = greedy
    top_k: int = 0             # 0 = no top-k filter
    top_p: float = 1.0         # 1 = no nucleus filter

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
                math.isfinite(t) and t >= 0):
            raise DsvError(f"--temperature must be a finite number >= 0, got {t!r}")
        try:
            k = operator.index(self.top_k)
        except TypeError:
            k = None
        if k is None or isinstance(self.top_k, bool) or k < 0:
            raise DsvError(f"--top-k must be an integer >= 0, got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise DsvError(f"--top-p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _softmax(z: np.ndarray) -> np.ndarray:
    """Probabilities of float64 scores z (some may be -inf)."""
    e = np.exp(z - z.max())
    return e / e.sum()


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions of the smallest most-probable set with total >= top_p, most probable first.

    Ties are ordered by lower position first, as a full stable sort would. Only the m
    largest probabilities are sorted; m grows (to the full sort when at least half of the
    ids will be needed) when they do not reach top_p or when the cut falls on a value
    shared with tokens outside them.
    """
    n = probs.size
    m = min(n, NUCLEUS_FIRST_TRY)
    while True:
        part = np.arange(n) if m == n else np.sort(np.argpartition(probs, n - m)[n - m:])
        order = part[np.argsort(-probs[part], kind="stable")]     # [m] most probable first
        cum = np.cumsum(probs[order])
        keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, m)
        reached = cum[keep - 1] >= top_p and probs[order[keep - 1]] > probs[order[-1]]
        if m == n or reached:
            return order[:keep]                                  # always holds the top token
        short = max(top_p - cum[-1], 0.0)              # the rest have probs <= the m-th one
        need = m + short / max(probs[order[-1]], np.finfo(np.float64).tiny)
        m = n if need * 2 >= n else min(n, max(m * 8, int(need * 2)))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id drawn from ``logits`` [vocab] under ``params``."""
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
    if np.isnan(logits).any():
        raise DsvError("the model produced NaN logits")
    top = int(np.argmax(logits))                                   # first max = lowest id
    if not np.isfinite(logits[top]):
        raise DsvError(f"the model produced no finite logit (largest is {logits[top]})")
    if params.greedy:
        return top

    vocab = logits.shape[0]
    if 0 < params.top_k < vocab:
        k = params.top_k                                           # T > 0 keeps the order
        ids = np.sort(np.argpartition(logits, vocab - k)[vocab - k:])   # [k] ascending ids
        z = logits[ids].astype(np.float64)                         # [k]
    else:
        ids = None                                                 # all ids
        z = logits.astype(np.float64)                              # [V]
    with np.errstate(over="ignore"):
        z /= params.temperature
    if not np.isfinite(z.max()):                                   # T so small that z overflows
        return top
    probs = _softmax(z)

    if params.top_p < 1.0:
        kept = _nucleus(probs, params.top_p)                       # [n] positions in probs
        ids = kept if ids is None else ids[kept]
        probs = probs[kept]

    cdf = np.cumsum(probs)                                         # [n] float64
    u = rng.random() * cdf[-1]
    j = min(int(np.searchsorted(cdf, u, side="right")), cdf.size - 1)
    return int(j if ids is None else ids[j])
