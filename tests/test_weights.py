"""Safetensors files: round trips, cross-checks with the official library, corruption, the writer."""

import json

import numpy as np
import pytest
import safetensors
from safetensors import safe_open
from st_helpers import one_line_error, same_bytes, write_raw

from dsv4.runtime import st_writer
from dsv4.runtime.errors import CheckpointError
from dsv4.runtime.st_writer import write_safetensors
from dsv4.runtime.weights import DTYPES, SafetensorsFile

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
