"""Safetensors reader/writer: round trips, cross-checks with the official library, corruption."""

import json
import os
import time

import numpy as np
import pytest
import safetensors
from safetensors import safe_open

from dsv4.runtime import st_writer
from dsv4.runtime.errors import CheckpointError
from dsv4.runtime.st_writer import ShardedWriter, write_index, write_safetensors
from dsv4.runtime.weights import DTYPES, INDEX_NAME, Checkpoint, SafetensorsFile

# our dtype string -> the name safetensors.TensorSpec takes
LIB_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
}
NUMPY_NATIVE = ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64", "C64"]
# storage shapes (for F4: packed bytes, so the logical last dimension is twice as large)
SHAPES = [(), (0,), (3, 0), (7,), (2, 3, 4)]


def storage_shapes(dtype):
    return [s for s in SHAPES if s] if dtype == "F4" else SHAPES


def random_array(rng, dtype, shape):
    """Arbitrary bit patterns (NaNs included) in the storage dtype; BOOL only 0/1."""
    storage = DTYPES[dtype][0]
    nbytes = int(np.prod(shape, dtype=np.int64)) * storage.itemsize
    raw = rng.integers(0, 2 if dtype == "BOOL" else 256, nbytes, dtype=np.uint8)
    return raw.view(storage).reshape(shape)


def same_bytes(a, b):
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def write_raw(path, header, data=b""):
    """A hand-made file: header is a JSON-able object, or raw bytes used as the header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(len(dtype))
    tensors = {f"t{i}": (dtype, random_array(rng, dtype, s)) for i, s in enumerate(storage_shapes(dtype))}
    path = tmp_path / "a.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np"})
    st = SafetensorsFile(path)
    assert st.names() == sorted(tensors)
    assert st.metadata == {"format": "np"}
    for name, (_, want) in tensors.items():
        got = st.tensor(name)
        assert got.dtype == DTYPES[dtype][0]
        assert same_bytes(got, want)
        info = st.info(name)
        logical = want.shape[:-1] + (2 * want.shape[-1],) if dtype == "F4" else want.shape
        assert info.dtype == dtype and info.shape == logical
        with open(path, "rb") as f:
            f.seek(info.begin)
            assert f.read(info.nbytes) == want.tobytes()


def test_writer_header_layout(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"b": ("F32", np.ones(3, np.float32)), "a": ("U8", np.ones(5, np.uint8)),
                             "c": ("I64", np.ones(2, np.int64))})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0
    names = [k for k in header if k != "__metadata__"]
    assert names == ["a", "b", "c"]
    assert [header[k]["data_offsets"] for k in names] == [[0, 5], [5, 17], [17, 33]]
    assert path.stat().st_size == 8 + n + 33


# ---------------------------------------------------------------- the official library


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_library_files_read_by_us(tmp_path, dtype):
    rng = np.random.default_rng(7)
    arrays = {f"x{i}": random_array(rng, dtype, s) for i, s in enumerate(storage_shapes(dtype))}
    specs = {name: safetensors.TensorSpec(dtype=LIB_NAMES[dtype], shape=list(a.shape),
                                          data_ptr=a.ctypes.data, data_len=a.nbytes)
             for name, a in arrays.items()}
    path = tmp_path / "lib.safetensors"
    safetensors.serialize_file(specs, path, metadata={"who": "lib"})
    st = SafetensorsFile(path)
    assert st.metadata == {"who": "lib"}
    assert st.names() == sorted(arrays)
    for name, want in arrays.items():
        assert st.info(name).dtype == dtype
        assert same_bytes(st.tensor(name), want)


@pytest.mark.parametrize("dtype", NUMPY_NATIVE)
def test_our_files_read_by_safe_open(tmp_path, dtype):
    rng = np.random.default_rng(11)
    arrays = {f"y{i}": random_array(rng, dtype, s) for i, s in enumerate(SHAPES)}
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, {k: (dtype, a) for k, a in arrays.items()}, metadata={"k": "v"})
    with safe_open(path, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(arrays)
        assert f.metadata() == {"k": "v"}
        for name, want in arrays.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype
            assert same_bytes(got, want)


@pytest.mark.parametrize("dtype", sorted(set(DTYPES) - set(NUMPY_NATIVE)))
def test_our_files_read_by_deserialize(tmp_path, dtype):
    rng = np.random.default_rng(13)
    arrays = {f"z{i}": random_array(rng, dtype, s) for i, s in enumerate(storage_shapes(dtype))}
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, {k: (dtype, a) for k, a in arrays.items()})
    got = dict(safetensors.deserialize(path.read_bytes()))
    assert sorted(got) == sorted(arrays)
    for name, want in arrays.items():
        logical = list(want.shape[:-1]) + [2 * want.shape[-1]] if dtype == "F4" else list(want.shape)
        assert got[name]["dtype"] == dtype
        assert list(got[name]["shape"]) == logical
        assert bytes(got[name]["data"]) == want.tobytes()


def test_f4_with_odd_last_dim_is_readable_but_not_viewable(tmp_path):
    a = np.arange(3, dtype=np.uint8)  # 6 codes: valid for the format, not a [2, k] byte array
    path = tmp_path / "f4.safetensors"
    write_raw(path, {"w": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, a.tobytes())
    st = SafetensorsFile(path)
    assert st.info("w").nbytes == 3
    with pytest.raises(CheckpointError, match="last dimension must be even") as e:
        st.tensor("w")
    one_line_error(e, path, "'w'")


# ---------------------------------------------------------------- corrupt files

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CORRUPT = {
    "shorter than 8 bytes": (None, b"\x01\x02\x03", "truncated safetensors file"),
    "header length past file": (None, (1000).to_bytes(8, "little") + b"{}", "header length 1000 exceeds file size"),
    "header length past limit": (None, (200_000_000).to_bytes(8, "little") + b"{}", "exceeds the 100000000-byte limit"),
    "header not JSON": (b"{not json", b"", "not valid JSON"),
    "header nested deeply": (b"[" * 100_000, b"", "nested too deeply"),
    "header not UTF-8": (b'{"\xff": 1}', b"", "not valid UTF-8"),
    "header not an object": (b"[1, 2]", b"", "must be a JSON object, got list"),
    "entry not an object": ({"x": 5}, b"", "'x': entry must be a JSON object"),
    "unknown dtype": ({"x": dict(F32x2, dtype="F12")}, bytes(8), "'x': unknown dtype 'F12'"),
    "unhashable dtype": ({"x": dict(F32x2, dtype=["F32"])}, bytes(8), "unknown dtype"),
    "negative shape": ({"x": dict(F32x2, shape=[-2])}, bytes(8), "non-negative integers"),
    "float shape": ({"x": dict(F32x2, shape=[2.0])}, bytes(8), "non-negative integers"),
    "bool shape": ({"x": dict(F32x2, shape=[True, 2])}, bytes(8), "non-negative integers"),
    "shape not a list": ({"x": dict(F32x2, shape=2)}, bytes(8), "non-negative integers"),
    "one offset": ({"x": dict(F32x2, data_offsets=[0])}, bytes(8), "two integers"),
    "begin after end": ({"x": dict(F32x2, data_offsets=[8, 0])}, bytes(8), r"0 <= begin <= end"),
    "negative begin": ({"x": dict(F32x2, data_offsets=[-8, 0])}, bytes(8), r"0 <= begin <= end"),
    "offsets outside data": ({"x": dict(F32x2, data_offsets=[8, 16])}, bytes(8), "past the end of the data region"),
    "size mismatch": ({"x": dict(F32x2, shape=[3])}, bytes(8), "span 8 bytes but F32 shape \\[3\\] needs 12"),
    "F4 half byte": ({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2), "whole bytes"),
    "overlap": ({"a": F32x2, "b": dict(F32x2, data_offsets=[4, 12])}, bytes(12), "'a' and 'b' overlap"),
    "metadata not str": ({"__metadata__": {"k": 1}}, b"", "__metadata__ must be an object"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file(tmp_path, case):
    header, data, match = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        SafetensorsFile(path)
    one_line_error(e, path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, {"a": ("F32", np.ones(4, np.float32)), "b": ("I64", np.ones(4, np.int64))})
    SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="truncated") as e:
        SafetensorsFile(path)
    one_line_error(e, path, "'b'")


def test_empty_tensors_may_share_offsets(tmp_path):
    header = {"a": F32x2, "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [4, 4]},
              "b": dict(F32x2, data_offsets=[8, 16])}
    st = SafetensorsFile(write_raw(tmp_path / "ok.safetensors", header, bytes(16)))
    assert st.tensor("e").shape == (0, 4)
    assert st.names() == ["a", "b", "e"]


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


# ---------------------------------------------------------------- writer edge cases


@pytest.mark.parametrize("dtype, arr, match", [
    ("F32", np.ones(4, np.float64), "needs 4-byte items"),
    ("BF16", np.ones(4, np.float32), "needs 2-byte items"),
    ("F32", np.ones((4, 4), np.float32)[:, ::2], "C-contiguous"),
    ("F33", np.ones(4, np.float32), "unknown dtype 'F33'"),
    ("F32", np.ones(4, ">f4"), "little-endian"),
    ("F4", np.array(3, np.uint8), "at least one dimension"),
    ("F32", [1.0, 2.0], "expected a numpy array"),
])
def test_writer_rejects_bad_tensors(tmp_path, dtype, arr, match):
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "x.safetensors", {"ok": ("U8", np.ones(2, np.uint8)), "bad": (dtype, arr)})
    assert list(tmp_path.iterdir()) == []


def test_writer_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": ("U8", np.ones(2, np.uint8))})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(st_writer.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"a": ("U8", np.zeros(9, np.uint8))})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


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

