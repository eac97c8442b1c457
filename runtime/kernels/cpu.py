"""Host CPU features and the choice of a kernel variant.

Variants in order of preference: 'avx512' (needs AVX-512 F/BW/VL + VBMI + BF16), 'avx2'
(AVX2 + FMA), 'numba' (plain Numba, runs anywhere). A variant is used only if the host has
its features, its code compiles, and it passes a numerical self-check against the NumPy
reference the first time it is tried in a process; otherwise the next one is tried.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass, field
from typing import Callable

import llvmlite.binding as llb

from .ir import REQUIRED, enabled_features, has_amx, missing_features

ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158   # Linux x86-64

VARIANTS = ("avx512", "avx2", "numba")


@functools.cache
def host_features() -> frozenset[str]:
    feats = llb.get_host_cpu_features()
    return frozenset(k for k, v in feats.items() if v)


@functools.cache
def host_cpu() -> str:
    return llb.get_host_cpu_name()


@functools.cache
def amx_ready() -> bool:
    """The prefill GEMM may use AMX tiles: Numba's code generator targets AMX-TILE and
    AMX-BF16 (so the avx512 module holds the tile kernel) and Linux granted this process
    the tile register state (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile
    instruction kills the process). Asked once per process; the grant is process-wide."""
    from numba.core.registry import cpu_target
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if not has_amx(enabled_features(cpu_target.target_context.codegen()._tm_features)):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def unmet(variant: str, features: frozenset[str]) -> tuple[str, ...]:
    """Features the variant needs that `features` lacks ('numba' needs none)."""
    if variant == "numba":
        return ()
    if variant not in REQUIRED:
        return (f"unknown variant {variant!r}",)
    return missing_features(variant, features)


@dataclass(frozen=True)
class Selection:
    variant: str
    log: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        return (f"gemv kernels: {self.variant} on {host_cpu()} ("
                + "; ".join(self.log) + ")")


def select(candidates, check: Callable[[str], str | None], features: frozenset[str] | None = None) -> Selection:
    """First candidate whose features are present and whose `check(variant)` returns None
    (an error text or an exception means failure). Raises if none passes."""
    feats = host_features() if features is None else features
    log = []
    for v in candidates:
        missing = unmet(v, feats)
        if missing:
            log.append(f"{v}: skipped, missing {', '.join(missing)}")
            continue
        try:
            err = check(v)
        except Exception as e:  # noqa: BLE001 - any failure (compile, run) means "not usable"
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if err is None:
            log.append(f"{v}: self-check passed")
            return Selection(v, tuple(log))
        log.append(f"{v}: failed ({err})")
    raise RuntimeError("no usable gemv kernel variant: " + "; ".join(log))
