"""Do the cores scale? Vector FMA throughput and memory read bandwidth with 1 .. N threads.

Decode is a mix of memory streaming and vector arithmetic (FP4/FP8 decoding, attention). On
a VM the logical CPUs may be hyperthreads of one physical core, or share it with other
tenants: the read bandwidth then still grows with the thread count while the arithmetic
does not, and the compute-bound kernels cap decode below the bandwidth. This prints both
per thread count, mean +- sd over repeats, so a bench row can be read against them.

    python bench/cores.py --threads 1 2 --reps 5
"""
from __future__ import annotations

import argparse
import os
import time

from dsv4.runtime.threads import threading_env

for _k, _v in threading_env("omp").items():     # the CLI's settings, before Numba loads
    os.environ.setdefault(_k, _v)

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from dsv4.runtime.kernels.membw import BandwidthProbe  # noqa: E402

LANES = 256          # float32 values per thread: 16 independent vector chains over an L1-resident array
STEPS = 400_000      # FMA steps per value


@njit(fastmath=True, cache=True)
def _chains(a, steps):
    for _ in range(steps):
        for j in range(a.size):
            a[j] = a[j] * np.float32(0.999) + np.float32(0.001)
    return a.sum()


@njit(parallel=True, cache=True)
def _fma_threads(a, steps):
    out = np.zeros(a.shape[0])
    for t in prange(a.shape[0]):
        out[t] = _chains(a[t], steps)
    return out.sum()


def fma_gflops(threads: int, steps: int = STEPS) -> float:
    """FMA GFLOP/s of `threads` threads, each on its own L1-resident array."""
    a = np.ones((threads, LANES), np.float32)
    t = time.perf_counter()
    _fma_threads(a, steps)
    return threads * steps * LANES * 2 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.reps < 1 or any(t < 1 or t > numba.config.NUMBA_NUM_THREADS for t in args.threads):
        ap.error(f"--threads must lie in 1..{numba.config.NUMBA_NUM_THREADS} and --reps be >= 1")
    _fma_threads(np.ones((1, LANES), np.float32), 10)          # compile / load from cache
    probe = BandwidthProbe()
    print("threads   FMA GFLOP/s (x of 1 thread)   read GB/s (x of 1 thread)")
    base = None
    for n in args.threads:
        numba.set_num_threads(n)
        _fma_threads(np.ones((n, LANES), np.float32), 10)
        f = np.array([fma_gflops(n) for _ in range(args.reps)])
        b = np.array([probe.measure(1) for _ in range(args.reps)])
        if base is None:
            base = (f.mean() / n, b.mean() / n)
        print(f"{n:7d}   {f.mean():7.1f} +- {f.std():5.1f} ({f.mean() / base[0]:4.2f})      "
              f"{b.mean():6.1f} +- {b.std():4.1f} ({b.mean() / base[1]:4.2f})")


if __name__ == "__main__":
    main()
