"""A digest of every source the compiled kernels are built from (no Numba import here).

Numba keys a cached function on the time stamp of its own file only, while our compiled
functions inline helpers and constants from other files (actq.quant_row inside the MoE
stage, the IR kernels inside the gemv driver, the number formats everywhere). After an
edit to one of those, or a `git pull` that touches some files only, a warm cache would run
the old inlined code. So the digest keys the cache twice: the CLI and the tests put
Numba's cache in a folder named after it (`cache_dir`), and the drivers built per ISA
carry it as a compile-time constant (which keys their cache entries wherever the cache is).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

HERE = Path(__file__).parent
KEEP = 3                   # digest folders kept in a cache root (the newest by use)


def source_files(root: Path = HERE.parent.parent) -> list[Path]:
    """The kernel package, the number formats and the constants the kernels read."""
    runtime = root / "runtime"
    return (sorted((runtime / "kernels").glob("*.py")) + sorted((root / "quant").glob("*.py"))
            + [runtime / "config.py", runtime / "nn.py"])


def digest_of(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


@functools.cache
def digest() -> str:
    """The digest of this installation's kernel sources (16 hex digits)."""
    root = HERE.parent.parent
    return digest_of(source_files(root), root)


def cache_dir(root: Path, keep: int = KEEP) -> Path:
    """`root/<digest>`, created, for NUMBA_CACHE_DIR. Other digest folders under root
    beyond the `keep` most recently used are removed (each holds tens of MB)."""
    here = root / digest()
    here.mkdir(parents=True, exist_ok=True)
    os.utime(here)                                    # mark as the most recently used
    others = [p for p in root.iterdir() if p.is_dir() and p != here and _is_digest(p.name)]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)
    return here


def use_default_cache() -> None:
    """Unless NUMBA_CACHE_DIR is set, point it at cache_dir(<dsv4 cache folder>/numba); call
    before Numba loads. A cache folder that cannot be made leaves Numba's own default."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    from ..model_store import cache_root  # noqa: PLC0415 - no NumPy or Numba there
    try:
        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir(cache_root() / "numba"))
    except OSError:
        pass


def _is_digest(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)
