"""Page sizes of the memory-mapped weights (Linux; elsewhere these are no-ops).

Decode streams every weight once per token. On 4 KB pages that is a TLB miss (a page
walk, its entries often evicted by the stream itself) every 4 KB; on 2 MB pages one per
2 MB. Linux maps a file with 2 MB pages when the page cache holds it in 2 MB folios (file
systems with large-folio support, e.g. xfs and recent ext4) and the mapping asks for them:
with MADV_HUGEPAGE, a page fault on uncached data reads it ahead as a 2 MB folio. Data
already cached in small folios stays small until it leaves the page cache, which `evict`
asks for. On the benchmark model a decoded token took 2-4% less time on 2 MB pages
(docs/performance.md).
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
    next reads come from disk and, under MADV_HUGEPAGE, fill 2 MB folios."""
    advice = getattr(os, "POSIX_FADV_DONTNEED", None)
    if advice is None:
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
        finally:
            os.close(fd)


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
