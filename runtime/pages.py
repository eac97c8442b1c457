"""Page sizes of the memory-mapped weights (Linux; elsewhere these are no-ops).

Decode streams every weight once per token. On 4 KB pages that is a TLB miss (a page
walk, its entries often evicted by the stream itself) every 4 KB; on 2 MB pages one per
2 MB. Linux maps a file with 2 MB pages when the page cache holds it in 2 MB folios (file
systems with large-folio support, e.g. xfs and recent ext4) and the mapping asks for them:
with MADV_HUGEPAGE, a page fault on uncached data reads it ahead as a 2 MB folio. Data
already cached in small folios (written there, read with read(), or read back piecemeal
under memory pressure) stays small until it leaves the page cache: `evict` drops whole
files, `settle_huge` finds the 2 MB chunks held in small folios and reads just those back.
How much that matters depends on the machine: on the benchmark model a decoded
token took 2-4% less time on 2 MB pages on one VM, and 2.3x less on another, whose page
walks are much dearer (docs/performance.md).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUGE = 2 << 20          # bytes in a 2 MB page


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


def read_into_memory(path: Path, progress: Callable[[int], None] | None = None,
                     chunk: int = 64 << 20, workers: int | None = None) -> np.ndarray:
    """The whole file read into this process's own memory (a private anonymous mapping
    advised for 2 MB pages, first written by this process), as a read-only uint8 array.

    Where the page cache sits matters on some machines: its pages are placed by whoever
    first wrote them, which for data read from disk can be memory that streams slower
    than the memory this process's threads get for themselves (docs/performance.md).
    Chunks whose first page the page cache did not hold before are dropped from it behind
    the read, so the copy does not also leave a second one there. Chunks are read by
    `workers` threads (default: the usable cores, at most 8); progress(bytes) is called
    on this thread as chunks finish."""
    size = os.path.getsize(path)
    mem = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # shared would be shmem
    advise_huge(mem)
    drop = getattr(os, "POSIX_FADV_DONTNEED", None)
    fd = os.open(path, os.O_RDONLY)
    view = memoryview(mem)
    try:
        offsets = range(0, size, chunk)
        cached = _first_pages_cached(fd, size, offsets)

        def read(i: int) -> int:
            off = offsets[i]
            n = min(chunk, size - off)
            got = 0
            while got < n:
                k = os.preadv(fd, [view[off + got:off + n]], off + got)
                if k == 0:
                    raise OSError(f"{path}: file ended at {off + got} of {size} bytes while reading it")
                got += k
            if drop is not None and cached is not None and not cached[i]:
                os.posix_fadvise(fd, off, n, drop)
            return n
        n_workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else (os.cpu_count() or 1))
        with ThreadPoolExecutor(max(1, n_workers)) as pool:
            for n in pool.map(read, range(len(offsets))):
                if progress is not None:
                    progress(n)
    finally:
        view.release()
        os.close(fd)
    out = np.frombuffer(mem, np.uint8, count=size)
    out.flags.writeable = False
    return out


def _first_pages_cached(fd: int, size: int, offsets) -> np.ndarray | None:
    """Per offset: does the page cache hold the file's page there? (None: unknown)"""
    mincore = _mincore()
    if mincore is None or size == 0:
        return None
    try:
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    view = np.frombuffer(mm, np.uint8)
    vec = np.zeros(1, np.uint8)
    out = np.zeros(len(offsets), bool)
    try:
        base = view.ctypes.data
        for i, off in enumerate(offsets):
            if mincore(base + off, mmap.PAGESIZE, vec.ctypes.data) != 0:
                return None
            out[i] = bool(vec[0] & 1)
        return out
    finally:
        del view
        mm.close()


def _mincore():
    """libc's mincore(addr, length, vec), or None where there is none."""
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mincore
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return fn


def _resident(mm: mmap.mmap, size: int) -> np.ndarray | None:
    """Per 4 KB page of the mapping: 1 where the page cache holds it (None: unknown)."""
    mincore = _mincore()
    if mincore is None:
        return None
    view = np.frombuffer(mm, np.uint8, count=size)
    vec = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
    try:
        return vec & 1 if mincore(view.ctypes.data, size, vec.ctypes.data) == 0 else None
    finally:
        del view


def _cached_chunks(mm: mmap.mmap, size: int) -> list[int] | None:
    """Offsets of the full 2 MB chunks of the mapping whose first page is cached (one
    mincore call of one page per chunk: a call over the whole file costs far more)."""
    mincore = _mincore()
    if mincore is None:
        return None
    view = np.frombuffer(mm, np.uint8, count=size)
    vec = np.zeros(1, np.uint8)
    out = []
    try:
        base = view.ctypes.data
        for off in range(0, size - HUGE + 1, HUGE):
            if mincore(base + off, mmap.PAGESIZE, vec.ctypes.data) != 0:
                return None
            if vec[0] & 1:
                out.append(off)
        return out
    finally:
        del view


def cached_share(path: Path) -> float | None:
    """Fraction of the file's pages held in the page cache (None where unknown)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        vec = _resident(mm, size)
        return None if vec is None else float(vec.mean())
    finally:
        mm.close()


def small_page_chunks(path: Path, batch: int = 4096, enough: float = 0.95) -> list[int] | None:
    """File offsets of the 2 MB chunks of `path` that the page cache holds in folios smaller
    than 2 MB, so that every mapping of them gets 4 KB pages. Chunks not cached are left out
    (a fault under MADV_HUGEPAGE reads them as 2 MB folios). Found without privileges: one
    mapping of the whole file with a byte of each cached chunk touched tells from smaps
    whether (almost) all of them are mapped on 2 MB pages; if not, each cached chunk is
    mapped and touched on its own and smaps says which ones are. `enough`: the share of
    cached chunks on 2 MB pages that ends the search with an empty list. None where the
    kernel does not tell (no smaps, no transparent huge pages, no mincore)."""
    size = os.path.getsize(path)
    if size < HUGE:
        return []
    if getattr(mmap, "MADV_HUGEPAGE", None) is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        try:
            if not advise_huge(whole):
                return None
            cached = _cached_chunks(whole, size)
            if cached is None:
                return None
            for off in cached:
                whole[off]                                   # fault in (mapped on 2 MB if it can)
            length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            found = [m for m in mappings([path]) or [] if _span(m) == (0, length)]
            if not found:
                return None
            if _kib(found[0], "FilePmdMapped") >= enough * len(cached) * HUGE:
                return []
        finally:
            whole.close()
        small: list[int] = []
        for i in range(0, len(cached), batch):
            probes = []
            for off in cached[i:i + batch]:
                mm = mmap.mmap(fd, HUGE, access=mmap.ACCESS_READ, offset=off)
                advise_huge(mm)
                mm[0]
                probes.append(mm)
            pmd = {_span(m)[0]: _kib(m, "FilePmdMapped") for m in mappings([path]) or []
                   if _span(m)[1] == HUGE}
            small += [off for off in cached[i:i + batch] if pmd.get(off, 0) < HUGE]
            for mm in probes:
                mm.close()
        return small
    finally:
        os.close(fd)


def settle_huge(paths: Iterable[Path]) -> int:
    """Drop from the page cache the chunks of the files that small_page_chunks finds (the
    kernel keeps those some process has mapped) and fault them back in, as 2 MB folios.
    The first such chunk on each file system goes alone, as a test: where it does not come
    back on a 2 MB page (no large folios there, or memory too fragmented), nothing more is
    dropped on that file system. Returns the bytes dropped."""
    advice = getattr(os, "POSIX_FADV_DONTNEED", None)
    dropped, refused = 0, set()
    for path in paths if advice is not None else ():
        dev = os.stat(path).st_dev
        chunks = [] if dev in refused else small_page_chunks(path)
        if not chunks:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, chunks[0], HUGE, advice)
            if not _maps_huge(fd, path, chunks[0]):
                refused.add(dev)
                continue
            for off in chunks[1:]:
                os.posix_fadvise(fd, off, HUGE, advice)
            _fault_in(fd, chunks[1:])              # read back now, one 2 MB folio per fault
            dropped += len(chunks) * HUGE
        finally:
            os.close(fd)
    return dropped


def _fault_in(fd: int, chunks: list[int]) -> None:
    """Touch the first byte of each chunk through a mapping advised for 2 MB pages."""
    if not chunks:
        return
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    try:
        advise_huge(mm)
        for off in chunks:
            mm[off]
    finally:
        mm.close()


def _maps_huge(fd: int, path: Path, off: int) -> bool:
    """Does a fresh mapping of the 2 MB chunk at `off`, once touched, use a 2 MB page?"""
    mm = mmap.mmap(fd, HUGE, access=mmap.ACCESS_READ, offset=off)
    try:
        advise_huge(mm)
        mm[0]
        return any(_span(m) == (off, HUGE) and _kib(m, "FilePmdMapped") >= HUGE
                   for m in mappings([path]) or [])
    finally:
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
                    current = ({"Address": fields[0], "Offset": fields[2]}
                               if len(fields) == 6 and fields[5].strip() in wanted else None)
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

    return MappedPages(sum(_kib(m, "Rss") for m in found),
                       sum(_kib(m, "FilePmdMapped") + _kib(m, "ShmemPmdMapped") for m in found))  # disk / tmpfs


def memory_pages(arrays: Iterable[np.ndarray], smaps: str = "/proc/self/smaps") -> MappedPages | None:
    """Resident and 2 MB-page bytes of the anonymous mappings that hold `arrays` (the
    copies read_into_memory makes; None where the kernel does not report them)."""
    starts = sorted(a.__array_interface__["data"][0] for a in arrays if a.size)
    resident = huge = 0
    hit = False
    try:
        with open(smaps) as f:
            text = f.read()
    except OSError:
        return None
    for block in text.split("\n"):
        fields = block.split(None, 1)
        if not fields:
            continue
        if not fields[0].endswith(":"):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            hit = any(lo <= s < hi for s in starts)
        elif hit and fields[0] == "Rss:":
            resident += int(fields[1].split()[0]) << 10
        elif hit and fields[0] == "AnonHugePages:":
            huge += int(fields[1].split()[0]) << 10
    return MappedPages(resident, huge)


def _kib(m: dict[str, str], field: str) -> int:
    """A smaps size field in bytes."""
    return int(m.get(field, "0 kB").split()[0]) << 10


def _span(m: dict[str, str]) -> tuple[int, int]:
    """(file offset, length) of a mapping from mappings()."""
    lo, hi = (int(a, 16) for a in m["Address"].split("-"))
    return int(m["Offset"], 16), hi - lo
