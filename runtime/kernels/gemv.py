"""Matrix-vector products for decode: y = W x with W in its checkpoint format.

Formats: 'fp4' (MXFP4 experts: int8/uint8 [O, K/2] packed e2m1 + uint8 e8m0 [O, K/32]),
'fp8' (uint8 e4m3 [O, K] + e8m0 tiles [ceil(O/b0), ceil(K/b1)]), 'bf16' (uint16 [O, K]),
'f32' (float32 [O, K]). Results are float32 with float32 accumulation and match the
float64 reference of the dequantized weight to accumulation rounding.

Use: x is prepared once per token for the format (`prepare_x_*`, or Kernels.prepare_x),
then one call computes many jobs: `MatTable` holds the addresses and shapes of a list of
same-format matrices (built once at load; views into memory-mapped files are fine, nothing
is copied) and `gemv_batch(table, mats, xp, xsel)` computes y_j = W[mats[j]] x[xsel[j]] for
all jobs j in ONE parallel region, split into (job x row-block) units of equal bytes.
`MixedTable` joins the tables of several formats so that `gemv_mixed` runs jobs of
different formats, each on x prepared for its format, in one region. The kernel variant
(avx512 / avx2 / numba) is chosen once per process (cpu.py); every
compiled driver is cached on disk (NUMBA_CACHE_DIR), so a second process starts fast.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from . import cpu, ir, prep, sources
from .aligned import aligned_copy, zeros_rows
from .bits import fetch_add
from .plain import row_block

FORMATS = ir.FORMATS
UNIT_BYTES = 32 * 1024        # weight bytes per parallel work unit
CHUNK_MAX = 128               # most units a thread takes from the shared counter at a time
GUIDE = 1                     # a chunk is at most the units left / (GUIDE * threads)
_WDTYPES = {"fp4": (np.uint8, np.int8), "fp8": (np.uint8,), "bf16": (np.uint16,), "f32": (np.float32,)}


@functools.cache
def _driver(isa: str):
    """The cached, parallel driver of one variant (all formats; see Kernels.gemv_batch)."""
    ISA, DIGEST = isa, sources.digest()  # noqa: N806 - compile-time constants

    def drive(addr, dims, xlen, mats, xsel, xp, xinfo, unit_bytes, nthreads, out):
        """addr [n, 2] (weight, scale) uint64; dims [n, 8] (O, K, b0, b1, scols, weight row
        bytes, scale row bytes, format index); xlen [n, 2] prepared-x lengths; xp [nx, L]
        prepared x rows, xinfo [nx, 3] = (nterms, floats used, format index) per row;
        nthreads: at least Numba's current thread count (the pool size will do: surplus
        loop iterations find no work left); out: the result buffer, or an empty array."""
        assert DIGEST != ""
        J = mats.shape[0]
        ustart = np.zeros(J + 1, np.int64)
        yoff = np.zeros(J + 1, np.int64)
        rbs = np.ones(J, np.int64)
        for j in range(J):
            m, i = mats[j], xsel[j]
            if m < 0 or m >= dims.shape[0] or i < 0 or i >= xp.shape[0]:
                raise IndexError("gemv_batch: matrix or x index out of range")
            if dims[m, 7] != xinfo[i, 2]:
                raise ValueError("gemv_batch: x prepared for another format than its matrix")
            if (xlen[m, 0] if xinfo[i, 0] == 0 else xlen[m, 1] * xinfo[i, 0]) != xinfo[i, 1] or xinfo[i, 1] > xp.shape[1]:
                raise ValueError("gemv_batch: prepared x does not match a matrix's K")
            rbs[j] = max(1, unit_bytes // max(1, dims[m, 5]))
            ustart[j + 1] = ustart[j] + (dims[m, 0] + rbs[j] - 1) // rbs[j]
            yoff[j + 1] = yoff[j] + dims[m, 0]
        if out.shape[0] == 0:
            y = np.empty(yoff[J], np.float32)
        elif out.shape[0] != yoff[J]:
            raise ValueError("gemv_batch: out has the wrong length")
        else:
            y = out
        xa, xs, ya = xp.ctypes.data, np.uint64(xp.strides[0]), y.ctypes.data
        # Units (job, row block) in job order are handed out in chunks from a shared
        # counter (dynamic scheduling): a thread slowed by a neighbour on its core does
        # not hold up the region.
        total = ustart[J]
        nthreads = max(1, min(nthreads, total))
        bounds = guided_chunks(total, nthreads)
        nchunks = bounds.shape[0] - 1
        counter = np.zeros(16, np.int64)                  # own cache line
        for _t in prange(nthreads):
            j = 0
            while True:
                c = fetch_add(counter, 0, 1)
                if c >= nchunks:
                    break
                u, end = bounds[c], bounds[c + 1]
                while u < end:                            # one call per job's run of units in the chunk
                    while ustart[j + 1] <= u:             # a thread's units only increase
                        j += 1
                    ue = min(end, ustart[j + 1])
                    m = mats[j]
                    r0 = (u - ustart[j]) * rbs[j]
                    nr = min((ue - ustart[j]) * rbs[j], dims[m, 0]) - r0
                    u = ue
                    w = addr[m, 0] + np.uint64(r0 * dims[m, 5])
                    s = addr[m, 1] + np.uint64(r0 * dims[m, 6])
                    x = xa + np.uint64(xsel[j]) * xs
                    nt = xinfo[xsel[j], 0]
                    yj = ya + np.uint64(4 * (yoff[j] + r0))
                    K, b0, b1, sc, fmt = dims[m, 1], dims[m, 2], dims[m, 3], dims[m, 4], dims[m, 7]
                    if fmt == 0:
                        row_block(ISA, "fp4", w, s, x, yj, nr, K, nt, r0, b0, b1, sc)
                    elif fmt == 1:
                        row_block(ISA, "fp8", w, s, x, yj, nr, K, nt, r0, b0, b1, sc)
                    elif fmt == 2:
                        row_block(ISA, "bf16", w, s, x, yj, nr, K, nt, r0, b0, b1, sc)
                    else:
                        row_block(ISA, "f32", w, s, x, yj, nr, K, nt, r0, b0, b1, sc)
        return y
    # A distinct name per variant: cached code of same-named closures compiled in different
    # processes can carry the same symbol names and clash when loaded into one process.
    drive.__name__ = drive.__qualname__ = f"gemv_driver_{isa}"
    return njit(cache=True, parallel=True, boundscheck=False)(drive)


@njit(cache=True, boundscheck=False)
def guided_chunks(total, nthreads):
    """Chunk boundaries over `total` units, largest first: each chunk is the units left /
    (GUIDE * nthreads), at most CHUNK_MAX and at least 1. Long chunks keep a thread on one
    contiguous stretch of weights (each new stretch starts before its software prefetch
    and with the hardware prefetcher cold: 32 KB chunks streamed ~20% slower than 2 MB
    ones); the short ones at the end even out the threads' finishing times. Fewer chunks
    also mean fewer trips to the shared counter: with GUIDE 1 and 128-unit chunks instead
    of 4 and 64 (~15 instead of ~50 chunks for a 32 MB region on 2 threads), decode on the
    Zen 5 VM rose from ~78% to ~81% of the read bandwidth in its fast phase, where the
    threads' shared work costs about twice as much (docs/performance.md, twenty-second
    session)."""
    bounds = np.empty(total + 1, np.int64)
    bounds[0] = 0
    n, start = 0, 0
    while start < total:
        start += min(CHUNK_MAX, max(1, (total - start) // (GUIDE * nthreads)))
        n += 1
        bounds[n] = start
    return bounds[:n + 1]


class XPrep(NamedTuple):
    """x prepared for one kernel variant and format (prep.py): data float32 [n, L]; nterms
    0 = the second layout (fp4 integers; bf16 on avx512: float32), else the number of bf16
    planes (1 for float layouts)."""
    data: np.ndarray
    nterms: int
    variant: str
    fmt: str
    b1: int


class MatTable:
    """Addresses and shapes of same-format matrices, built once (e.g. at model load).

    weights: list of 2-D arrays (C-contiguous rows; read-only / unaligned memmaps are fine);
    scales: matching e8m0 arrays for 'fp4' / 'fp8'; block: FP8 tile (b0, b1). The table
    keeps references to the arrays, so they stay mapped while it lives.
    """

    def __init__(self, fmt: str, weights, scales=None, block: tuple[int, int] = (128, 128)):
        if fmt not in FORMATS:
            raise ValueError(f"unknown gemv format {fmt!r}; expected one of {FORMATS}")
        if fmt in ("fp4", "fp8") and (scales is None or len(scales) != len(weights)):
            raise ValueError(f"{fmt} matrices need one scale array each")
        b0, b1 = (int(block[0]), int(block[1]))
        if b0 < 1 or b1 < 1:
            raise ValueError(f"fp8 block sizes must be positive, got {block}")
        self.fmt, self.code, self.block = fmt, FORMATS.index(fmt), (b0, b1)
        n = len(weights)
        self.addr = np.zeros((n, 2), np.uint64)
        self.dims = np.zeros((n, 8), np.int64)
        for i, w in enumerate(weights):
            s = None if scales is None else scales[i]
            o, k, sc = _check(fmt, w, s, (b0, b1), f"matrix {i}")
            self.addr[i] = (w.ctypes.data, 0 if s is None else s.ctypes.data)
            self.dims[i] = (o, k, b0, b1, sc, w.strides[0], 0 if fmt != "fp4" else s.strides[0], self.code)
        self._keep = (list(weights), None if scales is None else list(scales))
        self._xlen: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.dims.shape[0]

    @property
    def out_features(self) -> np.ndarray:
        return self.dims[:, 0]

    @property
    def in_features(self) -> np.ndarray:
        return self.dims[:, 1]

    def xlen(self, variant: str) -> np.ndarray:
        """Prepared-x lengths per matrix (int64 [n, 2], see prepared_len)."""
        if variant not in self._xlen:
            b1 = self.block[1]
            self._xlen[variant] = np.array([prepared_len(variant, self.fmt, int(k), b1) for k in self.in_features],
                                           np.int64).reshape(-1, 2)
        return self._xlen[variant]


class MixedTable:
    """Several MatTables (one per format) as one address table, so that matrices of
    different formats can share a parallel region (Kernels.gemv_mixed); row i of table f
    is row offset[f] + i here."""

    def __init__(self, tables):
        self.tables = {t.fmt: t for t in tables}
        if len(self.tables) != len(tables):
            raise ValueError("MixedTable: one table per format")
        self.offset, n = {}, 0
        for t in tables:
            self.offset[t.fmt] = n
            n += len(t)
        self.addr = np.concatenate([t.addr for t in tables]) if tables else np.zeros((0, 2), np.uint64)
        self.dims = np.concatenate([t.dims for t in tables]) if tables else np.zeros((0, 8), np.int64)
        self._xlen: dict[str, np.ndarray] = {}

    def xlen(self, variant: str) -> np.ndarray:
        if variant not in self._xlen:
            self._xlen[variant] = (np.concatenate([t.xlen(variant) for t in self.tables.values()])
                                   if self.tables else np.zeros((0, 2), np.int64))
        return self._xlen[variant]


def _check(fmt, w, s, block, what):
    if not isinstance(w, np.ndarray) or w.ndim != 2 or w.dtype not in [np.dtype(t) for t in _WDTYPES[fmt]]:
        raise ValueError(f"{what}: {fmt} weight must be a 2-D {'/'.join(np.dtype(t).name for t in _WDTYPES[fmt])}"
                         f" array, got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    if not w.flags.c_contiguous:
        raise ValueError(f"{what}: weight must be C-contiguous (strides {w.strides})")
    o, k = w.shape
    if fmt == "fp4":
        k *= 2
        if k % 32:
            raise ValueError(f"{what}: fp4 needs K a multiple of 32, got {k}")
        want = (o, k // 32)
    elif fmt == "fp8":
        want = (-(-o // block[0]), -(-k // block[1]))
    else:
        return o, k, 0
    if not isinstance(s, np.ndarray) or s.shape != want or s.dtype != np.uint8:
        raise ValueError(f"{what}: {fmt} scale must be uint8 {want}, got {getattr(s, 'dtype', type(s))} "
                         f"{getattr(s, 'shape', '')}")
    if not s.flags.c_contiguous:
        raise ValueError(f"{what}: scale must be C-contiguous")
    return o, k, want[1]


def prepared_len(variant: str, fmt: str, K: int, b1: int = 128) -> tuple[int, int]:
    """float32 length of one prepared x row: (layout of nterms 0 or -1, per bf16 plane /
    float); nterms 0 is the fp4 integer layout, or for bf16 on avx512 the float32 one."""
    if fmt == "f32":
        return -1, K
    n = len(prep.layout(variant, fmt, K, b1)[0])
    if variant == "avx512" and fmt in prep.TERM_FORMATS:
        n //= 2                                  # bf16 words, stored as float32 pairs
    if fmt == "fp4" and variant != "numba":
        return prep.int_len(K), n
    if fmt == "bf16" and variant == "avx512":
        return len(prep.layout("avx2", fmt, K, b1)[0]), n
    return -1, n


@dataclass(frozen=True)
class Kernels:
    """The gemv entry points of one kernel variant."""
    variant: str

    def prepare_x(self, fmt: str, x: np.ndarray, b1: int = 128) -> XPrep:
        """x [K] or [n, K] (any float) -> XPrep for this variant and format."""
        x2 = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        if x2.ndim != 2:
            raise ValueError(f"x must be 1-D or 2-D, got shape {np.shape(x)}")
        if fmt == "fp4" and x2.shape[1] % 32:
            raise ValueError(f"fp4 needs K a multiple of 32, got {x2.shape[1]}")
        data, nt = prep.prepare(self.variant, fmt, x2, int(b1))
        return XPrep(aligned_copy(data), nt, self.variant, fmt, int(b1))

    def gemv_batch(self, table: MatTable, mats, xp: XPrep, xsel=None, out: np.ndarray | None = None) -> np.ndarray:
        """y = concat_j W[mats[j]] @ x[xsel[j]] (float32 [sum of out_features]); into `out`
        (a C-contiguous float32 vector of that length) when given."""
        if xp.variant != self.variant or xp.fmt != table.fmt or (table.fmt == "fp8" and xp.b1 != table.block[1]):
            raise ValueError(f"x prepared for {xp.variant}/{xp.fmt}/b1={xp.b1}, table is "
                             f"{self.variant}/{table.fmt}/b1={table.block[1]}")
        mats = np.asarray(mats, np.int64)
        xsel = np.zeros(mats.shape[0], np.int64) if xsel is None else np.asarray(xsel, np.int64)
        if xsel.shape != mats.shape:
            raise ValueError("xsel must have one entry per job")
        xinfo = np.empty((xp.data.shape[0], 3), np.int64)
        xinfo[:] = (xp.nterms, xp.data.shape[1], table.code)
        return self.drive_rows(table, mats, xsel, xp.data, xinfo, out)

    def gemv_mixed(self, table: MixedTable, segments, out: np.ndarray | None = None) -> np.ndarray:
        """Jobs of several formats in ONE parallel region: segments [(fmt, rows of that
        format's table [J_i], XPrep, x rows [J_i])]; results in segment and job order."""
        mats, xsel, xs = [], [], []
        rows = 0
        for fmt, m, xp, xr in segments:
            t = table.tables.get(fmt)
            if t is None or xp.variant != self.variant or xp.fmt != fmt or (fmt == "fp8" and xp.b1 != t.block[1]):
                raise ValueError(f"x prepared for {xp.variant}/{xp.fmt}/b1={xp.b1} does not fit the {fmt} table")
            m, xr = np.asarray(m, np.int64), np.asarray(xr, np.int64)
            if m.shape != xr.shape:
                raise ValueError(f"{fmt} jobs: one x row per matrix needed")
            mats.append(m + table.offset[fmt])            # a row outside t: another format
            xsel.append(xr + rows)                        # (the driver checks formats)
            xs.append(xp)
            rows += xp.data.shape[0]
        if len(xs) == 1:
            xcat = xs[0].data
        else:
            xcat = zeros_rows(rows, max(xp.data.shape[1] for xp in xs))
        xinfo, r = np.empty((rows, 3), np.int64), 0
        for xp in xs:
            n, L = xp.data.shape
            if len(xs) > 1:
                xcat[r:r + n, :L] = xp.data
            xinfo[r:r + n] = (xp.nterms, L, FORMATS.index(xp.fmt))
            r += n
        return self.drive_rows(table, np.concatenate(mats), np.concatenate(xsel), xcat, xinfo, out)

    def drive_rows(self, table, mats, xsel, xdata, xinfo, out: np.ndarray | None = None) -> np.ndarray:
        """The driver on prepared rows: xdata [nx, L] with xinfo [nx, 3] = (nterms, floats
        used, format index) per row (also for rows prepared in compiled code, moe_step.py);
        the driver checks them against each job's matrix."""
        if out is None:
            out = _NONE
        elif out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable, C-contiguous float32 vector")
        return _driver(self.variant)(table.addr, table.dims, table.xlen(self.variant), mats, xsel, xdata, xinfo,
                                     UNIT_BYTES, numba.config.NUMBA_NUM_THREADS, out)

    def gemv(self, fmt: str, W: np.ndarray, S: np.ndarray | None, xp: XPrep,
             block: tuple[int, int] = (128, 128)) -> np.ndarray:
        """One matrix: y = W @ x, float32 [O] (builds a one-entry table)."""
        return self.gemv_batch(MatTable(fmt, [W], None if S is None else [S], block), _ONE, xp)


_ONE = np.zeros(1, np.int64)
_NONE = np.zeros(0, np.float32)


@functools.cache
def kernels(candidates: tuple[str, ...] | None = None) -> Kernels:
    """The selected kernel set (first variant of `candidates`, default cpu.VARIANTS, that
    the host supports and that passes the self-check); chosen once per process."""
    return Kernels(selection(candidates).variant)


@functools.cache
def selection(candidates: tuple[str, ...] | None = None) -> cpu.Selection:
    from .selfcheck import check  # noqa: PLC0415 - imports the NumPy references lazily
    sel = cpu.select(candidates or cpu.VARIANTS, check)
    logging.getLogger(__name__).info("%s", sel.describe())
    return sel


def describe() -> str:
    """Which kernel variant runs here and why (one line, for logs)."""
    return selection().describe()


# ------------------------------------------------------------------ convenience (selected variant)
def prepare_x_fp4(x: np.ndarray) -> XPrep:
    return kernels().prepare_x("fp4", x)


def prepare_x_fp8(x: np.ndarray, b1: int = 128) -> XPrep:
    return kernels().prepare_x("fp8", x, b1)


def prepare_x_bf16(x: np.ndarray) -> XPrep:
    return kernels().prepare_x("bf16", x)


def fp4_gemv(W: np.ndarray, S: np.ndarray, xp: XPrep) -> np.ndarray:
    """MXFP4: y[o] = sum_i e2m1(W[o, i]) * 2^(S[o, i // 32] - 127) * x[i]."""
    return kernels().gemv("fp4", W, S, xp)


def fp8_gemv(W: np.ndarray, S: np.ndarray, xp: XPrep, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """FP8: y[o] = sum_i e4m3(W[o, i]) * 2^(S[o // b0, i // b1] - 127) * x[i]."""
    return kernels().gemv("fp8", W, S, xp, block)


def bf16_gemv(W: np.ndarray, xp: XPrep) -> np.ndarray:
    """bf16 weights (uint16 bits): y = W @ x."""
    return kernels().gemv("bf16", W, None, xp)


def f32_gemv(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float32 weights: y = W @ x."""
    k = kernels()
    return k.gemv("f32", W, None, k.prepare_x("f32", x))


def gemv_batch(table: MatTable, mats, xp: XPrep, xsel=None, out: np.ndarray | None = None) -> np.ndarray:
    """Many jobs in one parallel region (see Kernels.gemv_batch)."""
    return kernels().gemv_batch(table, mats, xp, xsel, out)
