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


def openmp_env(threads: int, pin: bool = True) -> dict[str, str]:
    """OpenMP settings measured best for short parallel regions (kernel-notes §4).

    Only effective when set before Numba starts its thread pool (the CLI does so).
    """
    env = {"OMP_WAIT_POLICY": "active" if threads > 1 else "passive"}
    if pin:
        env.update({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"})
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
