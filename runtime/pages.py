"""Page sizes of the memory-mapped weights (Linux; elsewhere these are no-ops).

Decode streams every weight once per token. On 4 KB pages that is a TLB miss (a page
walk, its entries often evicted by the stream itself) every 4 KB; on 2 MB pages one per
2 MB. Linux maps a file with 2 MB pages when the page cache holds it in 2 MB folios (file
systems with large-folio support, e.g. xfs and recent ext4) and the mapping asks for them:
with MADV_HUGEPAGE, a page fault on uncached data reads it ahead as a 2 MB folio. Data
already cached in small folios stays small until it leaves the page cache, which `evict`
asks for. How much that matters depends on the machine: on the benchmark model a decoded
token took 2-4% less time on 2 MB pages on one VM, and 2.3x less on another, whose page
walks are much dearer (docs/performance.md).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def advise_huge(mm: mmap.mmap) -> bool:
    """Ask the kernel to map `mm` with transparent huge pages; False where it cannot."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        mm.madvise(advice)
    except OSError:                  # kernels without THP, or file systems that refuse it
        return False
    return True


def evict(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the files' cached pages (those no process has mapped), so the
    next reads come from disk and, under MADV_HUGEPAGE, fill 2 MB folios. Files just written
    are flushed first: the kernel only drops clean pages."""
    advice = getattr(os, "POSIX_FADV_DONTNEED", None)
    if advice is None:
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, advice)
        finally:
            os.close(fd)


def cached_share(path: Path) -> float | None:
    """Fraction of the file's pages held in the page cache (mincore; None where the C
    library has no mincore)."""
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    try:
        mincore = ctypes.CDLL(ctypes.util.find_library("c")).mincore
    except (OSError, AttributeError, TypeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, np.uint8)
    vec = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
    try:
        if mincore(view.ctypes.data, size, vec.ctypes.data) != 0:
            return None
        return float((vec & 1).mean())
    finally:
        del view
        mm.close()


@dataclass(frozen=True)
class MappedPages:
    """This process's resident pages of some files: all of them, and those on 2 MB pages."""
    resident: int
    huge: int

    @property
    def share(self) -> float:
        return self.huge / self.resident if self.resident else 0.0


def mappings(paths: Iterable[Path], smaps: str = "/proc/self/smaps") -> list[dict[str, str]] | None:
    """This process's mappings of `paths` as {smaps field: value} (None where the kernel does
    not report them)."""
    wanted = {str(Path(p).resolve()) for p in paths}
    out: list[dict[str, str]] = []
    current = None
    try:
        with open(smaps) as f:
            for line in f:
                fields = line.split(None, 5)
                if not fields:
                    continue
                if not fields[0].endswith(":"):                 # a mapping's first line
                    current = {} if len(fields) == 6 and fields[5].strip() in wanted else None
                    if current is not None:
                        out.append(current)
                elif current is not None:
                    current[fields[0][:-1]] = line.split(":", 1)[1].strip()
    except OSError:
        return None
    return out


def mapped_pages(paths: Iterable[Path], smaps: str = "/proc/self/smaps") -> MappedPages | None:
    """Resident and PMD-mapped bytes of this process's mappings of `paths` (None where the
    kernel does not report them)."""
    found = mappings(paths, smaps)
    if found is None:
        return None

    def kib(m, field):
        return int(m.get(field, "0 kB").split()[0]) << 10
    return MappedPages(sum(kib(m, "Rss") for m in found),
                       sum(kib(m, "FilePmdMapped") + kib(m, "ShmemPmdMapped") for m in found))  # disk / tmpfs
