"""Thread settings: one place that sets the Numba pool and the BLAS pool together.

On a machine whose cores are shared, OpenBLAS threads and Numba's OpenMP workers fighting
for the same cores cost far more than they give, so both follow one `threads` setting.
"""
from __future__ import annotations

import functools
import os

from .errors import DsvError


@functools.lru_cache(maxsize=1)
def available_cores() -> int:
    """CPUs this process may use, read once: after Numba's OpenMP pool starts with
    OMP_PROC_BIND, the main thread's own affinity shrinks to one core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


THREADING = ("omp", "omp-spin", "tbb")


def tbb_available() -> bool:
    """Whether Numba can use Intel TBB (the `tbb` package provides the library)."""
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def threading_env(mode: str = "omp") -> dict[str, str]:
    """Numba threading settings, applied before Numba starts its pool (the CLI does so).

    - omp (default): OpenMP, pinned; idle workers spin for GOMP_SPINCOUNT=30000 rounds
      (~0.5 ms here, libgomp's default of 300000 is ~5 ms) and then sleep: long enough to
      bridge the gaps between a decode step's parallel regions, short enough that prefill's
      BLAS threads get the cores (prefill ~20% faster than with the default, decode alike).
    - omp-spin: OpenMP workers spin between parallel regions (OMP_WAIT_POLICY=active):
      decode up to ~10% faster, prefill about half as fast (BLAS shares its cores with
      spinning threads). For generation-heavy use.
    - tbb: Intel TBB (needs the `tbb` package); measured here like omp.
    Variables already set by the user win.
    """
    if mode not in THREADING:
        raise DsvError(f"--threading must be one of {', '.join(THREADING)}, got '{mode}'")
    if mode == "tbb":
        if not tbb_available():
            raise DsvError("--threading tbb needs Intel TBB: pip install tbb")
        return {"NUMBA_THREADING_LAYER": "tbb"}
    env = {"NUMBA_THREADING_LAYER": "omp", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    if mode == "omp-spin":
        env["OMP_WAIT_POLICY"] = "active"
    else:
        env["GOMP_SPINCOUNT"] = "30000"
    return env


def set_threads(threads: int | None) -> int:
    """Limit BLAS (and Numba, once imported) to `threads`; None = all available cores."""
    n = available_cores() if threads is None else threads
    if n < 1:
        raise DsvError(f"--threads must be >= 1, got {threads}")
    n = min(n, available_cores())
    from threadpoolctl import threadpool_limits  # noqa: PLC0415
    threadpool_limits(n, user_api="blas")
    import sys  # noqa: PLC0415
    if "numba" in sys.modules:
        import numba  # noqa: PLC0415
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n
