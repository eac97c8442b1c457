"""Checkpoint folders: shards and index, lazy zero-copy access, prefaulting, the sharded writer."""

import json
import os
import time

import numpy as np
import pytest
from st_helpers import one_line_error, same_bytes, write_raw

from dsv4.runtime.errors import CheckpointError
from dsv4.runtime.st_writer import ShardedWriter, write_index, write_safetensors
from dsv4.runtime.weights import INDEX_NAME, Checkpoint, SafetensorsFile


# ---------------------------------------------------------------- checkpoint folders


def make_folder(folder, shards, index=True):
    """shards: {file name: {tensor: (dtype, array)}}; writes an index unless told not to."""
    folder.mkdir(exist_ok=True)
    for fname, tensors in shards.items():
        write_safetensors(folder / fname, tensors)
    if index:
        weight_map = {t: fname for fname, tensors in shards.items() for t in tensors}
        write_index(folder, weight_map, 0)
    return folder


def two_shards():
    return {"s1.safetensors": {"a": ("F32", np.arange(4, dtype=np.float32)), "c": ("U8", np.ones(2, np.uint8))},
            "s2.safetensors": {"b": ("I8", np.arange(6, dtype=np.int8).reshape(2, 3))}}


@pytest.mark.parametrize("index", [True, False])
def test_checkpoint_with_and_without_index(tmp_path, index):
    ck = Checkpoint(make_folder(tmp_path / "m", two_shards(), index=index))
    assert ck.names() == ["a", "b", "c"]
    assert "a" in ck and "zz" not in ck
    np.testing.assert_array_equal(ck.tensor("b"), np.arange(6).reshape(2, 3))
    assert ck.info("b").file.name == "s2.safetensors"
    assert ck.total_bytes() == 16 + 6 + 2
    assert ck.bytes_by_dtype() == {"F32": 16, "I8": 6, "U8": 2}


def edit_index(folder, edit):
    path = folder / INDEX_NAME
    doc = json.loads(path.read_text())
    edit(doc["weight_map"])
    path.write_text(json.dumps(doc))


def replace_index(folder, text):
    (folder / INDEX_NAME).write_text(text)


INDEX_DEFECTS = {
    "missing shard": (lambda f: os.unlink(f / "s2.safetensors"), "shard s2.safetensors .*does not exist"),
    "tensor absent from shard": (lambda f: edit_index(f, lambda wm: wm.update(ghost="s1.safetensors")),
                                 "'ghost' is mapped to s1.safetensors but that shard lacks it"),
    "shard tensor absent from index": (lambda f: edit_index(f, lambda wm: wm.pop("c")),
                                       "s1.safetensors holds tensors missing from weight_map: 'c'"),
    "not JSON": (lambda f: replace_index(f, "{oops"), "cannot read as JSON"),
    "not an object": (lambda f: replace_index(f, "[1]"), "'weight_map' object"),
    "weight_map a list": (lambda f: replace_index(f, '{"weight_map": []}'), "'weight_map' object"),
    "weight_map empty": (lambda f: replace_index(f, '{"weight_map": {}}'), "weight_map is empty"),
    "shard outside folder": (lambda f: edit_index(f, lambda wm: wm.update(a="../s1.safetensors")),
                             "'a' must name a shard file in the folder"),
}


@pytest.mark.parametrize("defect", list(INDEX_DEFECTS))
def test_index_defects(tmp_path, defect):
    folder = make_folder(tmp_path / "m", two_shards())
    Checkpoint(folder)
    damage, match = INDEX_DEFECTS[defect]
    damage(folder)
    with pytest.raises(CheckpointError, match=match) as e:
        Checkpoint(folder)
    one_line_error(e, INDEX_NAME)


def test_duplicate_names_without_index(tmp_path):
    shards = two_shards()
    shards["s3.safetensors"] = {"a": ("U8", np.zeros(1, np.uint8))}
    with pytest.raises(CheckpointError, match="'a' appears in both s1.safetensors and s3.safetensors"):
        Checkpoint(make_folder(tmp_path / "m", shards, index=False))


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder .*nope does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors files"):
        Checkpoint(tmp_path / "empty")


def test_missing_tensor_by_name(tmp_path):
    folder = make_folder(tmp_path / "m", two_shards())
    ck = Checkpoint(folder)
    with pytest.raises(CheckpointError, match="tensor 'layers.0.nope' not found in checkpoint") as e:
        ck.tensor("layers.0.nope")
    one_line_error(e, folder)
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        SafetensorsFile(folder / "s1.safetensors").tensor("nope")


# ---------------------------------------------------------------- lazy, zero-copy access


def test_open_reads_only_the_header(tmp_path):
    path = tmp_path / "big.safetensors"
    size = 50 << 20
    write_raw(path, {"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    with open(path, "r+b") as f:  # sparse tail: no data pages were ever written
        f.truncate(path.stat().st_size + size)
    SafetensorsFile(path)  # warm the import and file-system caches
    start = time.perf_counter()
    st = SafetensorsFile(path)
    assert time.perf_counter() - start < 0.05
    assert st._buf is None and Checkpoint(tmp_path)._files[path]._buf is None   # data mapped on first access
    assert st.tensor("w").shape == (size,)
    assert st._buf is not None


def test_views_are_read_only_and_zero_copy(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"u": ("U8", np.arange(3, dtype=np.uint8)),
                             "w": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3))})
    st = SafetensorsFile(path)
    w = st.tensor("w")
    assert type(w) is np.ndarray and w.dtype == np.float32
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 1
    assert st.buffer() is st.buffer()
    assert np.shares_memory(w, st.buffer()) and np.shares_memory(st.tensor("u"), st.buffer())
    np.testing.assert_array_equal(w, np.arange(6).reshape(2, 3))  # unaligned offset 3 is fine


def rss_file_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        pytest.skip("no RssFile in /proc/self/status")


def test_prefault_maps_pages_in(tmp_path):
    size = 16 << 20
    write_safetensors(tmp_path / "a.safetensors", {"w": ("U8", np.ones(size, np.uint8))})
    ck = Checkpoint(tmp_path)
    before = rss_file_kb()
    assert ck.prefault() == size
    assert rss_file_kb() - before > 0.9 * size / 1024


def test_prefault_background_maps_named_tensors_only(tmp_path):
    size = 16 << 20
    write_safetensors(tmp_path / "a.safetensors", {"w": ("U8", np.ones(size, np.uint8)),
                                                   "skip": ("U8", np.ones(size, np.uint8))})
    ck = Checkpoint(tmp_path)
    before = rss_file_kb()
    thread = ck.prefault_background(["w"])
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.daemon
    grown = rss_file_kb() - before
    assert 0.9 * size / 1024 < grown < 1.5 * size / 1024


# ---------------------------------------------------------------- the sharded writer


def test_sharded_writer_three_shards(tmp_path):
    folder = tmp_path / "ck"
    rng = np.random.default_rng(3)
    tensors = {f"layers.{i}.w": ("F32", rng.standard_normal(25).astype(np.float32)) for i in range(6)}
    tensors["embed.weight"] = ("BF16", rng.integers(0, 1 << 16, (4, 8), dtype=np.uint16))
    with ShardedWriter(folder, max_shard_bytes=300) as w:
        for name, (dtype, arr) in tensors.items():
            w.add(name, dtype, arr)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + [INDEX_NAME]
    doc = json.loads((folder / INDEX_NAME).read_text())
    assert list(doc["weight_map"]) == sorted(tensors)
    assert doc["metadata"]["total_size"] == 6 * 100 + 64
    ck = Checkpoint(folder)
    assert ck.names() == sorted(tensors)
    assert len({ck.info(n).file for n in ck.names()}) == 3
    for name, (_, arr) in tensors.items():
        assert same_bytes(ck.tensor(name), arr)
    assert ck.total_bytes() == 664 and ck.bytes_by_dtype() == {"BF16": 64, "F32": 600}
    seen = []
    assert ck.prefault(progress=lambda done, total: seen.append((done, total))) == 664
    assert seen[-1] == (664, 664)
    assert ck.prefault(names=["layers.0.w", "layers.1.w"]) == 200


def test_sharded_writer_oversized_tensor_and_abort(tmp_path):
    folder = tmp_path / "ck"
    with ShardedWriter(folder, max_shard_bytes=8) as w:
        w.add("small", "U8", np.ones(4, np.uint8))
        w.add("huge", "U8", np.ones(100, np.uint8))
        w.add("tail", "U8", np.ones(4, np.uint8))
        with pytest.raises(ValueError, match="already added"):
            w.add("huge", "U8", np.ones(1, np.uint8))
    ck = Checkpoint(folder)
    assert [ck.info(n).file.name[:11] for n in ("small", "huge", "tail")] == ["model-00001", "model-00002", "model-00003"]
    with pytest.raises(ValueError, match="already holds safetensors files"):
        ShardedWriter(folder, 8)
    other = tmp_path / "aborted"
    with pytest.raises(RuntimeError):
        with ShardedWriter(other, max_shard_bytes=8) as w:
            w.add("a", "U8", np.ones(8, np.uint8))
            w.add("b", "U8", np.ones(8, np.uint8))
            raise RuntimeError("generator failed")
    assert list(other.iterdir()) == []
