"""Page sizes of the memory-mapped weights (runtime/pages.py)."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from dsv4.runtime import pages
from dsv4.runtime.st_writer import write_safetensors
from dsv4.runtime.weights import SafetensorsFile


def test_weights_are_mapped_for_huge_pages(tmp_path):
    """The shard mapping asks for 2 MB pages (VmFlags 'hg' in smaps), and mapped_pages
    counts its resident bytes."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps")
    if not pages.advise_huge(mmap.mmap(-1, 4096)):
        pytest.skip("this kernel offers no transparent huge pages")
    path = tmp_path / "a.safetensors"
    size = 8 << 20
    write_safetensors(path, {"w": ("U8", np.ones(size, np.uint8))})
    st = SafetensorsFile(path)
    before = pages.mapped_pages([path])
    assert before is not None and before.resident == 0
    assert int(st.tensor("w")[::4096].sum()) == size // 4096
    found = pages.mappings([path])
    assert found, "the shard is not mapped"
    assert all("hg" in m["VmFlags"].split() for m in found)
    after = pages.mapped_pages([path])
    assert size <= after.resident <= size + (4 << 20)
    assert 0 <= after.huge <= after.resident
    assert pages.mapped_pages([tmp_path / "other.safetensors"]).resident == 0


def _keeps_pages(path) -> bool:
    """True for file systems whose files live in memory (their pages cannot be dropped)."""
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            mount, kind = line.split()[1:3]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs", "overlay")


def can_drop_pages(path) -> bool:
    return os.path.exists("/proc/mounts") and hasattr(os, "POSIX_FADV_DONTNEED") and not _keeps_pages(path)


def test_evict_drops_a_file_just_written(tmp_path):
    """A file just written is cached (dirty); evict flushes it and drops it from the page
    cache, so that the next read maps it anew (on 2 MB pages where the kernel allows)."""
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"w": ("U8", np.arange(1 << 20).astype(np.uint8))})
    share = pages.cached_share(path)
    if share is None or not can_drop_pages(tmp_path):
        pytest.skip("no mincore, or a file system that keeps its files in memory")
    assert share > 0.9
    pages.evict([path])
    assert pages.cached_share(path) < 0.1
    assert int(SafetensorsFile(path).tensor("w")[:256].sum()) == 255 * 128     # reads back
    assert pages.cached_share(path) > 0
