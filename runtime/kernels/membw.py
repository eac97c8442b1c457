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
        return read_bandwidth([self.buf], repeats)


def read_bandwidth(parts: list[np.ndarray], repeats: int = 3) -> float:
    """GB/s of the best of `repeats` passes over int64 arrays, one parallel sum each, with
    the current Numba thread count."""
    chunks = 8 * numba.get_num_threads()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for a in parts:
            _sum_chunks(a, chunks)
        best = min(best, time.perf_counter() - t)
    return sum(a.nbytes for a in parts) / best / 1e9


def sample_words(buffers: list[np.ndarray], nbytes: int = 1 << 30) -> list[np.ndarray]:
    """int64 views of up to `nbytes` of uint8 buffers (e.g. the weight shards), the same
    share from the middle of each, for read_bandwidth over the memory they sit in."""
    share = nbytes // max(1, len(buffers))
    out = []
    for b in buffers:
        n = min(share, b.size) // 8 * 8
        start = (b.size - n) // 2
        start += -(b.ctypes.data + start) % 8                 # an 8-byte aligned start
        n = min(n, b.size - start) // 8 * 8
        if n > 0:
            out.append(b[start:start + n].view(np.int64))
    return out
