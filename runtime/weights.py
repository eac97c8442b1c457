"""Safetensors reader: headers parsed and validated here, data served as zero-copy mmap views.

File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data region; offsets are relative to its start (byte 8 + N).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable

import numpy as np

from .errors import CheckpointError
from .pages import HUGE, advise_huge, read_into_memory

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000
PREFAULT_CHUNK = 64 << 20

# dtype string -> (numpy storage dtype, bits per element). Formats numpy lacks are served
# as raw unsigned integers of the same width; F4 packs two e2m1 codes per byte (low nibble
# first) and is served as uint8 with the last dimension halved.
DTYPES = MappingProxyType({
    "BOOL": (np.dtype(np.bool_), 8),
    "U8": (np.dtype(np.uint8), 8),
    "I8": (np.dtype(np.int8), 8),
    "U16": (np.dtype("<u2"), 16),
    "I16": (np.dtype("<i2"), 16),
    "U32": (np.dtype("<u4"), 32),
    "I32": (np.dtype("<i4"), 32),
    "U64": (np.dtype("<u8"), 64),
    "I64": (np.dtype("<i8"), 64),
    "F16": (np.dtype("<f2"), 16),
    "BF16": (np.dtype("<u2"), 16),
    "F32": (np.dtype("<f4"), 32),
    "F64": (np.dtype("<f8"), 64),
    "C64": (np.dtype("<c8"), 64),
    "F8_E4M3": (np.dtype(np.uint8), 8),
    "F8_E5M2": (np.dtype(np.uint8), 8),
    "F8_E4M3FNUZ": (np.dtype(np.uint8), 8),
    "F8_E5M2FNUZ": (np.dtype(np.uint8), 8),
    "F8_E8M0": (np.dtype(np.uint8), 8),
    "F4": (np.dtype(np.uint8), 4),
})


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int | None:
    """Bytes a tensor of this dtype and logical shape occupies; None if not whole bytes."""
    bits = DTYPES[dtype][1]
    count = 1
    for dim in shape:
        count *= dim
    total = count * bits
    return None if total % 8 else total // 8


def storage_shape(dtype: str, shape: tuple) -> tuple | None:
    """Shape of the numpy view for a logical shape; None if it cannot be expressed."""
    if DTYPES[dtype][1] == 8 * DTYPES[dtype][0].itemsize:
        return shape
    if not shape or shape[-1] % 2:
        return None
    return shape[:-1] + (shape[-1] // 2,)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: ``begin``/``end`` are absolute byte offsets in ``file``."""

    name: str
    dtype: str
    shape: tuple
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@contextlib.contextmanager
def _head_view(f, size: int):
    """The file's bytes, sliceable: through a mapping advised for 2 MB pages where the file
    holds at least one, so that reading the header leaves its first 2 MB in the page cache as
    one 2 MB folio (a read() would cache small pages there, which no mapping could then put
    on a 2 MB page); otherwise, or where the file cannot be mapped, through read()."""
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size >= HUGE else None
    except (OSError, ValueError):
        mm = None
    if mm is None:
        yield f.read(min(size, 8 + MAX_HEADER_BYTES))
        return
    try:
        advise_huge(mm)
        yield mm
    finally:
        mm.close()


def _read_header(path: Path) -> tuple[dict, int, int]:
    """Return (parsed JSON header, data region start, data region size)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; the header length alone needs 8)")
            with _head_view(f, size) as head:
                n = int.from_bytes(head[:8], "little")
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
                if n > size - 8:
                    raise CheckpointError(f"{path}: header length {n} exceeds file size {size} minus 8")
                raw = head[8:8 + n]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: header is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n, size - 8 - n


def _check_metadata(path: Path, meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of string to string")
    return meta


def _entry_error(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name!r}: {what}")


def _check_entry(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if type(entry) is not dict:
        raise _entry_error(path, name, "entry must be a JSON object")
    dtype = entry.get("dtype")
    if type(dtype) is not str or dtype not in DTYPES:
        raise _entry_error(path, name, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _entry_error(path, name, f"shape must be a list of non-negative integers, got {shape!r}")
    offsets = entry.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int \
            or type(offsets[1]) is not int:
        raise _entry_error(path, name, f"data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _entry_error(path, name, f"data_offsets {offsets} must satisfy 0 <= begin <= end")
    if end > data_size:
        raise _entry_error(path, name, f"data_offsets {offsets} run past the end of the data region "
                                       f"({data_size} bytes; file truncated?)")
    nbytes = tensor_nbytes(dtype, shape)
    if nbytes is None:
        raise _entry_error(path, name, f"{dtype} shape {shape} does not fill whole bytes")
    if end - begin != nbytes:
        raise _entry_error(path, name,
                           f"data_offsets span {end - begin} bytes but {dtype} shape {shape} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, infos: Iterable[TensorInfo]) -> None:
    spans = sorted((i.begin, i.end, i.name) for i in infos if i.end > i.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap in the data region")


def _touch_pages(buf: np.ndarray, begin: int, end: int) -> int:
    """Fault in every page of buf[begin:end] by reading one byte per page (and the last byte,
    whose page the stride can miss when begin is not page-aligned)."""
    if end <= begin:
        return 0
    seg = buf[begin:end]
    return int(seg[::mmap.PAGESIZE].max()) | int(seg[-1])


class SafetensorsFile:
    """One shard. The header is parsed at construction; data is mapped on first access, or
    with ``in_memory`` read into this process's memory (pages.read_into_memory)."""

    def __init__(self, path: str | os.PathLike, in_memory: bool = False):
        self.path = Path(path)
        self.in_memory = in_memory
        header, data_start, data_size = _read_header(self.path)
        self.metadata = _check_metadata(self.path, header.pop("__metadata__", None))
        self._infos = {name: _check_entry(self.path, name, entry, data_start, data_size)
                       for name, entry in header.items()}
        _check_no_overlap(self.path, self._infos.values())
        self._buf = None
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        return sorted(self._infos)

    def infos(self) -> Iterable[TensorInfo]:
        return self._infos.values()

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def buffer(self, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The whole file as a read-only uint8 array over a shared mapping, opened once and
        advised for 2 MB pages (pages.advise_huge); with in_memory, over this process's copy
        (read once; progress(bytes) as it goes)."""
        with self._lock:
            if self._buf is None and self.in_memory:
                self._buf = read_into_memory(self.path, progress)
            elif self._buf is None:
                with open(self.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                advise_huge(mm)
                self._buf = np.frombuffer(mm, dtype=np.uint8)
            return self._buf

    def tensor(self, name: str) -> np.ndarray:
        return self.view(self.info(name))

    def view(self, info: TensorInfo) -> np.ndarray:
        """Read-only zero-copy ndarray for a TensorInfo of this file."""
        np_dtype = DTYPES[info.dtype][0]
        shape = storage_shape(info.dtype, info.shape)
        if shape is None:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} is {info.dtype} with shape {list(info.shape)}; "
                "its last dimension must be even to view it as packed bytes")
        raw = self.buffer()[info.begin:info.end]
        return raw.view(dtype=np_dtype, type=np.ndarray).reshape(shape)


def _index_shards(index: Path) -> dict[str, list[str]]:
    """The shards an index file names, each with its tensor names (checked: a JSON
    weight_map of plain file names that exist next to the index)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read as JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object")
    if not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if shard not in by_shard:
            if type(shard) is not str or not shard or Path(shard).name != shard:
                raise CheckpointError(
                    f"{index}: weight_map entry {name!r} must name a shard file in the folder, got {shard!r}")
            by_shard[shard] = []
        by_shard[shard].append(name)
    for shard, names in by_shard.items():
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} (for tensor {names[0]!r}) does not exist")
    return by_shard


def _all_shards(folder: Path) -> list[Path]:
    """Every *.safetensors file of a folder without an index (at least one)."""
    paths = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not paths:
        raise CheckpointError(f"model folder {folder} holds no *.safetensors files and no {INDEX_NAME}")
    return paths


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The shard files of a model folder, as Checkpoint finds them, without parsing their
    headers (for page-cache work before loading)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    index = folder / INDEX_NAME
    return [folder / s for s in sorted(_index_shards(index))] if index.exists() else _all_shards(folder)


class Checkpoint:
    """A model folder: shards located through ``model.safetensors.index.json`` or, without
    one, every ``*.safetensors`` file in the folder. ``in_memory``: read the shards into
    this process's memory instead of mapping them (see read_in)."""

    def __init__(self, folder: str | os.PathLike, in_memory: bool = False):
        self.folder = Path(folder)
        self.in_memory = in_memory
        if not self.folder.is_dir():
            raise CheckpointError(f"model folder {self.folder} does not exist")
        index = self.folder / INDEX_NAME
        self._files: dict[Path, SafetensorsFile] = {}
        self._infos: dict[str, TensorInfo] = {}
        if index.exists():
            self._open_indexed(index)
        else:
            self._open_all()

    def _open_indexed(self, index: Path) -> None:
        by_shard = _index_shards(index)
        for shard in sorted(by_shard):
            path = self.folder / shard
            st = SafetensorsFile(path, self.in_memory)
            listed = by_shard[shard]
            for name in listed:
                if name not in st:
                    raise CheckpointError(f"{index}: tensor {name!r} is mapped to {shard} but that shard lacks it")
            if len(st) != len(listed):
                extra = sorted(set(st.names()) - set(listed))
                shown = ", ".join(repr(n) for n in extra[:3]) + (" ..." if len(extra) > 3 else "")
                raise CheckpointError(f"{index}: shard {shard} holds tensors missing from weight_map: {shown}")
            self._files[path] = st
            for info in st.infos():
                self._infos[info.name] = info

    def _open_all(self) -> None:
        for path in _all_shards(self.folder):
            st = SafetensorsFile(path, self.in_memory)
            for info in st.infos():
                prior = self._infos.get(info.name)
                if prior is not None:
                    raise CheckpointError(
                        f"tensor {info.name!r} appears in both {prior.file.name} and {path.name} in {self.folder}")
                self._infos[info.name] = info
            self._files[path] = st

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        return sorted(self._infos)

    def files(self) -> list[Path]:
        return sorted(self._files)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in checkpoint {self.folder}") from None

    def tensor(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self._files[info.file].view(info)

    def file_bytes(self) -> int:
        """Bytes of all shard files (headers included)."""
        return sum(os.path.getsize(p) for p in self._files)

    def read_in(self, progress: Callable[[int, int], None] | None = None) -> None:
        """With in_memory, read every shard into memory now (else on first use of each);
        progress(done_bytes, total_bytes) as it goes. Nothing to do for mapped shards."""
        if not self.in_memory:
            return
        total, done = self.file_bytes(), 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)
        for path in sorted(self._files):
            self._files[path].buffer(step)

    def buffers(self) -> list[np.ndarray]:
        """Every shard's whole-file array (mapped, or read in), in file order."""
        return [self._files[p].buffer() for p in sorted(self._files)]

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in self._infos.values():
            out[info.dtype] = out.get(info.dtype, 0) + info.nbytes
        return dict(sorted(out.items()))

    def prefault(self, names: Iterable[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> int:
        """Fault in the pages of the named tensors (all by default) so later reads hit RAM.

        ``progress(done_bytes, total_bytes)`` is called after each chunk. Returns the bytes covered.
        """
        infos = self._infos.values() if names is None else [self.info(n) for n in names]
        spans: dict[Path, list[tuple[int, int]]] = {}
        for info in infos:
            if info.end > info.begin:
                spans.setdefault(info.file, []).append((info.begin, info.end))
        merged = {path: _merge_spans(s) for path, s in spans.items()}
        total = sum(e - b for s in merged.values() for b, e in s)
        done = 0
        for path in sorted(merged):
            buf = self._files[path].buffer()
            for begin, end in merged[path]:
                for start in range(begin, end, PREFAULT_CHUNK):
                    stop = min(end, start + PREFAULT_CHUNK)
                    _touch_pages(buf, start, stop)
                    done += stop - start
                    if progress is not None:
                        progress(done, total)
        return total

    def prefault_background(self, names: Iterable[str]) -> threading.Thread:
        """Start a daemon thread that faults in the named tensors' pages, in the order given.

        The page touches run in NumPy with the GIL released, so this overlaps with start-up
        work on the main thread (imports, kernel loading, tokenizer) on another core.
        """
        names = list(names)
        thread = threading.Thread(target=self.prefault, args=(names,), daemon=True,
                                  name="dsv4-prefault")
        thread.start()
        return thread


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for begin, end in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return [(b, e) for b, e in out]
