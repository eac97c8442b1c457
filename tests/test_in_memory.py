"""Weights read into process memory (--no-mmap) and the memory-read comparison of `dsv4 bench`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_cli import dsv4, one_line_error
from test_pages import can_drop_pages

from dsv4.cli.bench import memory_line, weights_memory
from dsv4.runtime import pages
from dsv4.runtime.kernels.membw import BandwidthProbe, read_bandwidth, sample_words
from dsv4.runtime.model import Model
from dsv4.runtime.numerics import Numerics
from dsv4.runtime.weights import Checkpoint


def _file(path, size: int, seed: int = 0):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data.tofile(path)
    return data


def test_read_into_memory_copies_the_file(tmp_path):
    """Every byte, in a read-only private array, chunk by chunk on several threads, with
    progress adding up to the size; on 2 MB pages where the kernel gives them."""
    path = tmp_path / "w.bin"
    size = 5 * (1 << 20) + 12345
    data = _file(path, size)
    seen = []
    a = pages.read_into_memory(path, seen.append, chunk=1 << 20, workers=3)
    assert a.dtype == np.uint8 and a.shape == (size,) and np.array_equal(a, data)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    assert sum(seen) == size and len(seen) == 6
    held = pages.memory_pages([a])
    if held is not None:                              # Linux: this process's own pages
        assert size <= held.resident <= size + (4 << 20) and 0 <= held.huge <= held.resident
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert pages.read_into_memory(empty).size == 0


def test_read_into_memory_drops_only_what_it_brought_into_the_page_cache(tmp_path):
    path = tmp_path / "w.bin"
    _file(path, 4 << 20)
    if pages.cached_share(path) is None or not can_drop_pages(tmp_path):
        pytest.skip("no mincore, or a file system that keeps its files in memory")
    pages.evict([path])
    pages.read_into_memory(path, chunk=1 << 20)
    assert pages.cached_share(path) < 0.1             # not left behind as a second copy
    with open(path, "rb") as f:
        f.read()
    assert pages.cached_share(path) > 0.9
    pages.read_into_memory(path, chunk=1 << 20)
    assert pages.cached_share(path) > 0.9             # someone's cached file stays cached


def test_read_into_memory_reports_a_file_that_ends_early(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    _file(path, 1 << 20)
    monkeypatch.setattr(pages.os.path, "getsize", lambda p: 3 << 20)   # shrank after the size was read
    with pytest.raises(OSError, match="file ended at"):
        pages.read_into_memory(path, chunk=1 << 20)


def test_checkpoint_and_model_in_memory_match_the_mapped_ones(tiny_dir):
    """Same tensors, same logits; read_in reports the shards' bytes; the buffers are the
    process's own memory."""
    mapped, held = Checkpoint(tiny_dir), Checkpoint(tiny_dir, in_memory=True)
    progress = []
    held.read_in(lambda done, total: progress.append((done, total)))
    total = held.file_bytes()
    assert progress[-1] == (total, total) and total == sum(p.stat().st_size for p in held.files())
    for name in mapped.names():
        a, b = mapped.tensor(name), held.tensor(name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert not b.flags.writeable
    mem = pages.memory_pages(held.buffers())
    if mem is not None:
        assert mem.resident >= total
    Checkpoint(tiny_dir).read_in(lambda *_: pytest.fail("mapped shards have nothing to read in"))
    ids = np.array([1, 5, 9, 3])
    m1 = Model.load(tiny_dir, Numerics(), backend="ref")
    m2 = Model.load(tiny_dir, Numerics(), backend="ref", in_memory=True)
    assert m2.ckpt.in_memory and not m1.ckpt.in_memory
    np.testing.assert_array_equal(m1.forward(ids, m1.new_cache(8)), m2.forward(ids, m2.new_cache(8)))


def test_sample_words_are_aligned_views_inside_the_buffers():
    raw = np.zeros(3 << 20, np.uint8)
    bufs = [raw[3:(1 << 20) + 3], raw[(1 << 20) + 5:(3 << 20) - 1], raw[:7]]
    words = sample_words(bufs, 1 << 20)
    assert 0 < sum(w.nbytes for w in words) <= 1 << 20
    for w in words:
        assert w.dtype == np.int64 and w.ctypes.data % 8 == 0
        assert any(b.ctypes.data <= w.ctypes.data and w.ctypes.data + w.nbytes <= b.ctypes.data + b.nbytes
                   for b in bufs)
    assert read_bandwidth(words, repeats=1) > 0


def test_weights_memory_and_its_line(tiny_dir):
    """Both read rates are measured (here on a sample the tiny model can give); the line
    suggests --no-mmap only for mapped weights that read under 90% of fresh memory."""
    ckpt = Checkpoint(tiny_dir)
    got = weights_memory(ckpt, BandwidthProbe(1 << 20), sample=1 << 20)
    assert got is not None and got[0] > 0 and got[1] > 0
    assert weights_memory(ckpt, BandwidthProbe(1 << 20), sample=1 << 40) is None   # too small to say
    assert "--no-mmap" in memory_line(15.0, 20.0, in_memory=False)
    assert "(75%)" in memory_line(15.0, 20.0, in_memory=False)
    assert "--no-mmap" not in memory_line(19.0, 20.0, in_memory=False)
    assert "--no-mmap" not in memory_line(15.0, 20.0, in_memory=True)
    assert "--no-mmap" not in memory_line(15.0, 20.0, in_memory=False, hint=False)


def test_cli_no_mmap(tiny_dir):
    """generate --no-mmap writes what the mapped run writes; bench says where the weights
    were; --no-mmap with --reload-pages is a usage error."""
    args = ["generate", "-m", str(tiny_dir), "-p", "Hello", "-n", "6", "--greedy", "-q"]
    r1, r2 = dsv4(*args), dsv4(*args, "--no-mmap")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    assert r1.stdout == r2.stdout
    r = dsv4("bench", "-m", str(tiny_dir), "-p", "0", "-n", "2", "-r", "1", "-t", "1", "--json", "--no-mmap")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["weights_in_memory"] is True and len(out["rows"]) == 1
    if os.path.exists("/proc/self/smaps"):
        assert out["weight_pages"]["resident_bytes"] >= sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    one_line_error(dsv4(*args, "--no-mmap", "--reload-pages"), "--no-mmap")
