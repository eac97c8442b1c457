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


def _huge_file_support(tmp_path) -> bool:
    """Can a file here be read back into 2 MB folios and mapped on 2 MB pages?"""
    if not os.path.exists("/proc/self/smaps") or not can_drop_pages(tmp_path):
        return False
    if not pages.advise_huge(mmap.mmap(-1, 4096)):
        return False
    probe = tmp_path / "probe.bin"
    probe.write_bytes(bytes(pages.HUGE * 2))
    pages.evict([probe])
    with open(probe, "rb") as f:
        st = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pages.advise_huge(st)
    st[0]
    st[pages.HUGE]
    huge = pages.mapped_pages([probe]).huge
    st.close()
    probe.unlink()
    return huge > 0


def _cache_in_small_folios(path) -> None:
    """Evict the file, then read it back 4 KB at a time with readahead off: order-0 folios."""
    pages.evict([path])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        while os.read(fd, 4096):
            pass
    finally:
        os.close(fd)


def test_small_page_chunks_are_found_and_read_back_on_2mb_pages(tmp_path):
    """A file cached in small folios: every full 2 MB chunk is reported, settle_huge drops
    and re-reads them (2 MB folios), after which a mapping of the file is on 2 MB pages and
    no chunk is reported; the data is unchanged."""
    if not _huge_file_support(tmp_path):
        pytest.skip("no 2 MB folios for files here (kernel, file system or /proc)")
    path = tmp_path / "w.safetensors"
    data = np.random.default_rng(0).integers(0, 256, 5 * pages.HUGE + 12345, dtype=np.uint8)
    write_safetensors(path, {"w": ("U8", data)})
    _cache_in_small_folios(path)
    assert pages.cached_share(path) == 1.0
    small = pages.small_page_chunks(path)
    full = os.path.getsize(path) // pages.HUGE
    assert small == [c * pages.HUGE for c in range(full)]
    assert pages.settle_huge([path]) == full * pages.HUGE
    assert pages.small_page_chunks(path) == []
    st = SafetensorsFile(path)
    np.testing.assert_array_equal(st.tensor("w"), data)
    mapped = pages.mapped_pages([path])
    assert mapped.huge >= (full - 1) * pages.HUGE           # the file's mapping: 2 MB pages
    assert pages.settle_huge([path]) == 0                    # nothing left to do


def test_uncached_chunks_are_left_alone(tmp_path):
    """Chunks not in the page cache are not reported (a fault reads them as 2 MB folios)."""
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": ("U8", np.ones(3 * pages.HUGE, np.uint8))})
    if not can_drop_pages(tmp_path) or pages.cached_share(path) is None:
        pytest.skip("cannot drop pages here")
    pages.evict([path])
    assert pages.small_page_chunks(path) in ([], None)
    assert pages.cached_share(path) < 0.1                    # the check did not read the file in


def test_settle_gives_up_where_chunks_do_not_come_back_huge():
    """On a file system that keeps files in memory (tmpfs), dropping does nothing: the first
    chunk does not come back on a 2 MB page, so nothing is counted as dropped."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or not os.path.exists("/proc/self/smaps"):
        pytest.skip("no writable /dev/shm")
    with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") if os.path.exists(
            "/sys/kernel/mm/transparent_hugepage/shmem_enabled") else open(os.devnull) as f:
        if "[always]" in f.read():
            pytest.skip("tmpfs gives 2 MB pages here")
    path = os.path.join(shm, f"dsv4-test-{os.getpid()}.bin")
    try:
        with open(path, "wb") as f:
            f.write(bytes(3 * pages.HUGE))
        assert pages.small_page_chunks(path) in ([0, pages.HUGE, 2 * pages.HUGE], None)
        assert pages.settle_huge([path]) == 0
        assert os.path.getsize(path) == 3 * pages.HUGE
    finally:
        os.unlink(path)


def test_shard_paths_lists_what_checkpoint_opens(tmp_path):
    """The page-cache work before loading lists the shards without parsing them: the same
    files Checkpoint opens, with and without an index; a bad folder is a CheckpointError."""
    import json

    from dsv4.runtime.errors import CheckpointError
    from dsv4.runtime.weights import INDEX_NAME, Checkpoint, shard_paths
    for name in ("b.safetensors", "a.safetensors"):
        write_safetensors(tmp_path / name, {name[0]: ("U8", np.ones(4, np.uint8))})
    assert shard_paths(tmp_path) == Checkpoint(tmp_path).files() == [tmp_path / "a.safetensors",
                                                                      tmp_path / "b.safetensors"]
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"b": "b.safetensors"}}))
    (tmp_path / "a.safetensors").unlink()
    assert shard_paths(tmp_path) == Checkpoint(tmp_path).files() == [tmp_path / "b.safetensors"]
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"c": "c.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not exist"):
        shard_paths(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        shard_paths(tmp_path / "missing")
