"""Safetensors writer: single files, the HF index, and a sharding writer for generated checkpoints.

Every file is written under a temporary name in the target folder and renamed into place,
so an error never leaves a partial file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .weights import DTYPES, INDEX_NAME


def _checked(name, dtype, arr) -> tuple[list[int], np.ndarray]:
    """Validate one tensor; return its header shape and its bytes as a flat uint8 array."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"tensor name {name!r} is not allowed")
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"tensor {name!r}: expected a numpy array, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"tensor {name!r}: array must be C-contiguous")
    storage, bits = DTYPES[dtype]
    if arr.dtype.itemsize != storage.itemsize:
        raise ValueError(
            f"tensor {name!r}: {dtype} needs {storage.itemsize}-byte items, array has "
            f"{arr.dtype} ({arr.dtype.itemsize} bytes)")
    if arr.dtype.itemsize > 1 and arr.dtype.byteorder == ">":
        raise ValueError(f"tensor {name!r}: array must be little-endian, got {arr.dtype}")
    shape = list(arr.shape)
    if bits == 4:  # two codes per stored byte: the header records the logical element count
        if not shape:
            raise ValueError(f"tensor {name!r}: {dtype} needs at least one dimension of packed bytes")
        shape[-1] *= 2
    return shape, arr.reshape(-1).view(np.uint8)


def _header(entries: list[tuple[str, str, list[int], int]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to path, then rename it to path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``{name: (dtype, array)}`` as one safetensors file; returns the data bytes written.

    F4 arrays hold packed bytes (two codes each); their header shape doubles the last dimension.
    """
    path = Path(path)
    entries, blobs = [], []
    for name in sorted(tensors):
        item = tensors[name]
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"tensor {name!r}: expected a (dtype, array) pair")
        shape, blob = _checked(name, *item)
        entries.append((name, item[0], shape, blob.size))
        blobs.append(blob)
    head = _header(entries, metadata)

    def write(f):
        f.write(head)
        for blob in blobs:
            if blob.size:
                f.write(blob)

    _atomic_write(path, write)
    return sum(b.size for b in blobs)


def write_index(folder: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write ``model.safetensors.index.json`` (keys sorted) into folder; returns its path."""
    path = Path(folder) / INDEX_NAME
    doc = {"metadata": {"total_size": int(total_size)},
           "weight_map": {name: weight_map[name] for name in sorted(weight_map)}}
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


class ShardedWriter:
    """Stream tensors into ``model-0000k-of-0000N.safetensors`` shards plus the index.

    Tensors are buffered until adding the next one would pass ``max_shard_bytes`` (a tensor
    larger than the limit gets a shard of its own), so at most about one shard is held.
    Shards carry temporary names until ``close()``; leaving a ``with`` block by an
    exception deletes them.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / INDEX_NAME).exists() or any(self.folder.glob("*.safetensors")):
            raise ValueError(f"{self.folder} already holds safetensors files; choose an empty folder")
        self.max_shard_bytes = int(max_shard_bytes)
        self._pending: dict[str, tuple[str, np.ndarray]] = {}
        self._pending_bytes = 0
        self._shard_of: dict[str, int] = {}
        self._parts: list[Path] = []
        self._total = 0
        self._closed = False

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def add(self, name: str, dtype: str, array: np.ndarray) -> None:
        if self._closed:
            raise ValueError("ShardedWriter is closed")
        if name in self._shard_of or name in self._pending:
            raise ValueError(f"tensor {name!r} was already added")
        nbytes = _checked(name, dtype, array)[1].size
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = (dtype, array)
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        part = self.folder / f"shard-{len(self._parts) + 1:05d}.safetensors.partial"
        self._total += write_safetensors(part, self._pending)
        self._parts.append(part)
        for name in self._pending:
            self._shard_of[name] = len(self._parts)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Path:
        """Write the last shard, give shards their final names, write the index; returns it."""
        if self._closed:
            raise ValueError("ShardedWriter is closed")
        if self._pending:
            self._flush()
        if not self._parts:
            raise ValueError(f"no tensors were added for {self.folder}")
        count = len(self._parts)
        finals = [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        for part, final in zip(self._parts, finals):
            os.replace(part, self.folder / final)
        self._closed = True
        weight_map = {name: finals[k - 1] for name, k in self._shard_of.items()}
        return write_index(self.folder, weight_map, self._total)

    def abort(self) -> None:
        """Drop buffered tensors and delete shards not yet renamed."""
        for part in self._parts:
            part.unlink(missing_ok=True)
        self._parts, self._pending, self._closed = [], {}, True
