"""Per-token preparation of x for the gemv kernels: permuted, pre-scaled, split into bf16.

Each kernel variant wants x in the order its weight decode produces, so a prepared x only
works with the variant that made it. `prepare` maps x [n, K] float32 to [n, L]:
- fp4 on avx512 and avx2, when every 32-group of x is integer * 2^E with |integer| < 2^23
  (always for e4m3-quantized activations): the integer layout of `fp4_int` (nterms 0).
- avx512: bf16 planes. x = t0 + t1 + t2 exactly, t_j bf16 (`nterms` = 3); when x is already
  bf16-exact (e4m3-quantized activations are) one plane suffices (`nterms` = 1). bf16
  weights with x that is not bf16-exact take the avx2 float32 layout instead (`nterms` 0).
  fp4 [group][nterms][32 words]; fp8 [tile][chunk][nterms][64 words], chunks of 64 restarting
  at each b1-tile; bf16 [chunk][nterms][32 words] in natural order.
- avx2: float32. fp4 [pair of groups][64] * 2^-25; fp8 [tile][chunk][32] * 2^60 (a tile's
  last partial chunk in natural order); bf16 [chunk][8 even | 8 odd] (partial chunk natural).
- numba: natural order; fp8 * 2^60.
f32 weights take x as it is in every variant. Everything here is NumPy (a gather with a
cached index per shape), so nothing needs compiling.
"""
from __future__ import annotations

import functools

import numpy as np

from . import ir_avx2, ir_avx512

F32 = np.float32
TERM_FORMATS = ("fp4", "fp8", "bf16")  # formats whose avx512 kernel takes bf16 planes
_TERM_CHUNK = {"fp4": 32, "fp8": 64, "bf16": 32}   # words of one plane per chunk


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.asarray(x, F32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_terms(x: np.ndarray, nterms: int) -> np.ndarray:
    """x float32 [...] -> [nterms, ...] bf16 bits; their sum is x exactly when nterms = 3."""
    out = np.empty((nterms,) + x.shape, np.uint16)
    r = np.array(x, F32)
    for j in range(nterms):
        out[j] = bf16_rne(r)
        r = r - (out[j].astype(np.uint32) << np.uint32(16)).view(F32)
    return out


def bf16_exact(x: np.ndarray) -> bool:
    return not np.any(np.asarray(x, F32).view(np.uint32) & np.uint32(0xFFFF))


def _tiles(K: int, b1: int, chunk: int, perm: np.ndarray, natural_tail: bool) -> np.ndarray:
    """Element index (-1 = zero) of each slot: chunks of `chunk` restarting at every b1-tile."""
    cpt = -(-b1 // chunk)
    out = []
    for t0 in range(0, K, b1):
        ln = min(b1, K - t0)
        for c in range(cpt):
            full = (c + 1) * chunk <= ln
            e = c * chunk + (perm if (full or not natural_tail) else np.arange(chunk))
            out.append(np.where(e < ln, t0 + e, -1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@functools.cache
def layout(variant: str, fmt: str, K: int, b1: int) -> tuple[np.ndarray, float]:
    """(slot -> element index, -1 for zero padding; scale factor) of one bf16 plane / row."""
    if fmt == "f32" or variant == "numba":
        return np.arange(K), (2.0 ** 60 if fmt == "fp8" else 1.0)
    if variant == "avx512":
        if fmt == "fp4":
            return (np.arange(0, K, 32)[:, None] + ir_avx512.fp4_word_elements()[None]).ravel(), 1.0
        if fmt == "fp8":
            return _tiles(K, b1, 64, ir_avx512.fp8_word_elements(), False), 1.0
        if fmt == "bf16":
            return _tiles(K, K, 32, np.arange(32), False), 1.0
    if fmt == "fp4":
        npairs = -(-(K // 32) // 2)
        e = (np.arange(npairs)[:, None] * 64 + ir_avx2.fp4_pair_elements()[None]).ravel()
        return np.where(e < K, e, -1), ir_avx2.FP4_X_SCALE
    if fmt == "fp8":
        return _tiles(K, b1, 32, ir_avx2.fp8_chunk_elements(), True), ir_avx2.FP8_X_SCALE
    return _tiles(K, K, 16, ir_avx2.bf16_chunk_elements(), True), 1.0


def _gather(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """src [..., K] -> [..., L] with src[..., idx], zero where idx == -1."""
    pad = np.concatenate([src, np.zeros(src.shape[:-1] + (1,), src.dtype)], axis=-1)
    return np.take(pad, idx, axis=-1)


INT_BLOCK = 512                        # bytes per 4 groups in the fp4 integer layout


def int_header(K: int) -> int:
    """int32 words before the blocks: [n2, nfull, order[nblocks]], padded to 64 bytes."""
    return -(-(2 + -(-(K // 32) // 4)) // 16) * 16


def int_len(K: int) -> int:
    """float32 units of one fp4 integer-layout row."""
    return int_header(K) + -(-(K // 32) // 4) * INT_BLOCK // 4


def _lsb_exponent(x: np.ndarray) -> np.ndarray:
    """Exponent of the lowest set bit of each float32 (x = odd integer * 2^lsb); 999 for 0."""
    u = np.asarray(x, F32).view(np.uint32).astype(np.int64)
    e = (u >> 23) & 0xFF
    m = np.where(e > 0, (u & 0x7FFFFF) | 0x800000, u & 0x7FFFFF)
    tz = np.log2((m & -m).astype(np.float64), where=m > 0, out=np.zeros(m.shape)).astype(np.int64)
    return np.where(m > 0, np.maximum(e, 1) - 150 + tz, 999)


def fp4_int(x: np.ndarray) -> np.ndarray | None:
    """x [n, K] -> fp4 integer layout, or None when some 32-group does not fit (Numba)."""
    from .prep_nb import fp4_int_rows  # noqa: PLC0415
    n, K = x.shape
    out = np.empty((n, int_len(K)), F32)
    ok = fp4_int_rows(np.ascontiguousarray(x, dtype=F32), int_header(K), out)
    return out if ok else None


def balanced_digits(c: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Signed base-256 digits of integers c: c = sum_d 256^d digit_d with every digit in
    [-128, 127] (int64 arrays, little end first), and what the n digits leave over."""
    digits = []
    for _ in range(n):
        d = ((c + 128) & 255) - 128
        digits.append(d)
        c = (c - d) >> 8
    return digits, c


def fp4_int_numpy(x: np.ndarray) -> np.ndarray | None:
    """x [n, K] -> fp4 integer layout, or None when some 32-group does not fit.

    Per group g, E = the lowest set bit exponent of its values and c = x * 2^-E (exact
    integers) must have three signed base-256 digits (balanced_digits; |c| < 2^23 does,
    e4m3-quantized x needs at most 18 bits). A 4-group block takes 512 bytes: 16 int32
    corrections [64] (lane L: -12 times the sum of c over elements 8L..8L+7; the kernels
    look the weights up as 2*e2m1 + 12, unsigned, so this takes the offset back out), then
    for digit d = 0, 1, 2 of c the even elements [64] and the odd elements [64] (int8),
    then 16 float32 factors 2^(E-1) (4 per group; the kernels use 2*e2m1). Full blocks
    whose c have two digits come first: the header lists n2, the number of full blocks
    and the original index of each stored block; a partial last block (K/32 not a
    multiple of 4) stays last.
    """
    n, K = x.shape
    ng, nb = K // 32, -(-(K // 32) // 4)
    xg = np.zeros((n, nb * 4, 32), F32)
    xg[:, :ng] = x.reshape(n, ng, 32)
    E = _lsb_exponent(xg).min(axis=-1)
    E = np.where(E == 999, 0, E)
    if np.any((E - 1 < -126) | (E - 1 > 127)):
        return None
    a = np.ldexp(xg.astype(np.float64), -E[..., None])
    if np.abs(a).max(initial=0) >= 2 ** 23:
        return None
    c = a.astype(np.int64)
    digits, rest = balanced_digits(c, 3)
    if np.any(rest != 0):
        return None
    big = (digits[2] != 0).reshape(n, nb, -1).any(axis=-1)           # [n, nb] needs 3 digits
    nfull = ng // 4
    order = np.empty((n, nb), np.int64)
    n2 = np.empty(n, np.int64)
    for i in range(n):
        two = np.flatnonzero(~big[i, :nfull])
        n2[i] = two.size
        order[i] = np.concatenate([two, np.flatnonzero(big[i, :nfull]), np.arange(nfull, nb)])
    blk = np.zeros((n, nb, INT_BLOCK), np.uint8)
    per_block = lambda v: v.reshape(n, nb, 64)  # noqa: E731 - [n, 4*nb, 16] -> [n, nb, 64]
    corr = (-12 * c.reshape(n, nb, 16, 8).sum(axis=-1)).astype(np.int32)      # [n, nb, 16]
    blk[:, :, :64] = corr.view(np.uint8)
    for d in range(3):
        digit = digits[d].astype(np.int8).view(np.uint8)
        blk[:, :, 64 + 128 * d:128 + 128 * d] = per_block(digit[..., 0::2])
        blk[:, :, 128 + 128 * d:192 + 128 * d] = per_block(digit[..., 1::2])
    fac = np.repeat(np.ldexp(F32(1), E - 1).astype(F32), 4, axis=-1)     # [n, 16*nb]
    blk[:, :, 448:] = fac.reshape(n, nb, 16).view(np.uint8)
    out = np.zeros((n, int_len(K)), F32)
    head = out[:, :int_header(K)].view(np.int32)
    head[:, 0], head[:, 1], head[:, 2:2 + nb] = n2, nfull, order
    out[:, int_header(K):] = np.take_along_axis(blk, order[..., None], axis=1).reshape(n, -1).view(F32)
    return out


def prepare(variant: str, fmt: str, x: np.ndarray, b1: int = 128) -> tuple[np.ndarray, int]:
    """x [n, K] float32 (C-contiguous) -> (prepared float32 [n, L], nterms); nterms 0 marks
    the format's second layout (fp4: integers; bf16 on avx512: the avx2 float32 layout, for
    x that is not bf16-exact), > 0 the number of bf16 planes (stored as float32 pairs)."""
    x = np.ascontiguousarray(x, dtype=F32)
    n, K = x.shape
    if fmt == "f32":
        return x, 1
    if fmt == "fp4" and variant in ("avx512", "avx2"):
        xi = fp4_int(x)
        if xi is not None:
            return xi, 0
    from .prep_nb import bf16_exact_rows, bf16_gather_rows, gather_rows, terms_rows  # noqa: PLC0415
    if variant == "avx512" and fmt == "bf16" and not bf16_exact_rows(x):
        idx, _ = layout("avx2", fmt, K, b1)              # 3 planes would triple the x reads:
        out = np.empty((n, idx.size), F32)               # the ymm float kernel instead
        gather_rows(x, idx, F32(1.0), out)
        return out, 0
    idx, scale = layout(variant, fmt, K, b1)
    if variant == "avx512" and fmt in TERM_FORMATS:
        nt = 1 if bf16_exact_rows(x) else 3
        out16 = np.empty((n, idx.size * nt), np.uint16)
        if nt == 1:
            bf16_gather_rows(x, idx, out16)
        else:
            terms_rows(x, idx, _TERM_CHUNK[fmt], nt, out16)
        return out16.view(F32), nt
    out = np.empty((n, idx.size), F32)
    gather_rows(x, idx, F32(scale), out)
    return out, 1


def prepare_numpy(variant: str, fmt: str, x: np.ndarray, b1: int = 128) -> tuple[np.ndarray, int]:
    """The NumPy reference of `prepare` (tests compare the two)."""
    n, K = x.shape
    if fmt == "f32":
        return x, 1
    if fmt == "fp4" and variant in ("avx512", "avx2"):
        xi = fp4_int_numpy(x)
        if xi is not None:
            return xi, 0
    if variant == "avx512" and fmt == "bf16" and not bf16_exact(x):
        return _gather(x, layout("avx2", fmt, K, b1)[0]), 0
    idx, scale = layout(variant, fmt, K, b1)
    if variant == "avx512" and fmt in TERM_FORMATS:
        nt = 1 if bf16_exact(x) else 3
        g = _gather(bf16_terms(x, nt), idx)                       # [nt, n, L1]
        per = _TERM_CHUNK[fmt]
        out = np.ascontiguousarray(g.reshape(nt, n, -1, per).transpose(1, 2, 0, 3)).reshape(n, -1)
        return out.view(F32), nt
    out = _gather(x, idx)
    if scale != 1.0:
        out *= F32(scale)
    return out, 1
