"""Buffers on 64-byte boundaries.

SIMD loads that straddle cache lines cost: kv/q/out rows of the sparse attention 8-15%
(AVX2 and AVX-512 code), and x rows of the gemv kernels, which load x in zmm vectors at
offsets that are multiples of 64 bytes from the row's start (the avx512 MXFP4 kernel with x
16 bytes off: 6.9 instead of 6.1 ns per block of two rows from L2, 5% slower from memory;
docs/performance.md). NumPy aligns small arrays to 16 bytes and Numba's allocator to 32 at
times, so such buffers come from here. Kernels.prepare_x starts its rows aligned, and the x
layouts' row lengths are multiples of 64 bytes, so every row of a batch is aligned too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

ALIGN = 64                    # bytes
ROW_FLOATS = ALIGN // 4       # zeros_rows pads rows to a multiple of this many float32


def aligned_empty(shape, dtype=np.float32, align: int = ALIGN) -> np.ndarray:
    """Uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(n * dtype.itemsize + align, np.uint8)
    off = -buf.ctypes.data % align
    return buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_copy(x: np.ndarray) -> np.ndarray:
    """x itself when its data starts on a 64-byte boundary, else an aligned copy (for small
    per-call inputs)."""
    if x.ctypes.data % ALIGN == 0:
        return x
    y = aligned_empty(x.shape, x.dtype)
    y[...] = x
    return y


@njit(cache=True)
def zeros_rows(rows, cols):
    """Zeroed float32 [rows, cols rounded up to 16] whose rows all start on 64-byte
    boundaries (usable in compiled code, where the buffers of prepared x rows are made)."""
    width = (cols + ROW_FLOATS - 1) // ROW_FLOATS * ROW_FLOATS
    buf = np.zeros(rows * width + ROW_FLOATS, np.float32)
    skip = (ALIGN - buf.ctypes.data % ALIGN) % ALIGN // 4
    return buf[skip:skip + rows * width].reshape(rows, width)
