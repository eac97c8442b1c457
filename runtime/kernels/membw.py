"""Memory read bandwidth, measured the way kernel-notes recommends: a wide, simple read
(int64 sum in one Numba prange region) over >= 1 GiB, with the thread count of the run it
normalizes. Reported in GB/s (1e9 bytes)."""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True, boundscheck=False)
def _sum(a):
    s = np.int64(0)
    for i in range(a.size):
        s += a[i]
    return s


@njit(parallel=True, cache=True, boundscheck=False)
def _sum_chunks(a, nchunks):
    step = (a.size + nchunks - 1) // nchunks
    part = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        part[c] = _sum(a[c * step:min(a.size, (c + 1) * step)])
    return part.sum()


class BandwidthProbe:
    """Holds a >= 1 GiB buffer (pages touched once) and measures read GB/s on demand."""

    def __init__(self, nbytes: int = 1 << 30):
        self.buf = np.ones(max(nbytes // 8, 1 << 20), np.int64)
        _sum_chunks(self.buf[:1 << 16], 4)                    # compile / load from cache

    def measure(self, repeats: int = 3) -> float:
        """Best of `repeats` passes over the buffer with the current Numba thread count."""
        chunks = 8 * numba.get_num_threads()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            _sum_chunks(self.buf, chunks)
            best = min(best, time.perf_counter() - t)
        return self.buf.nbytes / best / 1e9
