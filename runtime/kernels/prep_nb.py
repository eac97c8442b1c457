"""Per-token preparation of x in Numba (the layouts of prep.py, same bytes).

Decode prepares x for every gemv call; the NumPy versions cost 20-500 microseconds per
call in small-array overhead, these a few.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .bits import bits_f32, f32_bits

INT_BLOCK = 512


@njit(inline="always")
def _lsb(v):
    """Exponent of the lowest set bit of float32 v (v = odd * 2^lsb); 999 for zero."""
    u = f32_bits(v) & np.uint32(0x7FFFFFFF)
    if u == 0:
        return 999
    e = np.int64(u >> np.uint32(23))
    m = np.int64(u & np.uint32(0x7FFFFF))
    if e > 0:
        m |= 0x800000
    low = m & -m                                  # lowest set bit, a power of two < 2^24
    tz = np.int64(f32_bits(np.float32(low)) >> np.uint32(23)) - 127
    return max(e, 1) - 150 + tz


@njit(cache=True, boundscheck=False)
def fp4_int_rows(x, header, out):
    """x float32 [n, K] -> out float32 [n, L] (header int32 words, then 512-byte blocks).
    Returns False when some 32-group does not fit (then nothing is usable)."""
    n, K = x.shape
    ng = K // 32
    nb = (ng + 3) // 4
    nfull = ng // 4
    blocks = np.zeros((nb, INT_BLOCK), np.uint8)
    words = blocks.view(np.int32)                   # [nb, 128]: words 0-15 the corrections
    big = np.zeros(nb, np.bool_)
    order = np.empty(nb, np.int64)
    ob = out.view(np.uint8)
    oi = out.view(np.int32)
    for r in range(n):
        blocks[:] = 0
        big[:] = False
        for g in range(nb * 4):
            b, gl = g // 4, g % 4
            E = 999
            if g < ng:
                for i in range(32):
                    E = min(E, _lsb(x[r, g * 32 + i]))
            if E == 999:
                E = 0
            if E - 1 < -126 or E - 1 > 127:
                return False
            fac = bits_f32(np.uint32(E - 1 + 127) << np.uint32(23))
            fb = f32_bits(fac)
            for q in range(4):          # 4 copies of the factor per group
                o = 448 + (gl * 4 + q) * 4
                blocks[b, o] = fb & 0xFF
                blocks[b, o + 1] = (fb >> 8) & 0xFF
                blocks[b, o + 2] = (fb >> 16) & 0xFF
                blocks[b, o + 3] = (fb >> 24) & 0xFF
            if g >= ng:
                continue
            inv = math.ldexp(1.0, -E)                 # exact: x * 2^-E is an integer
            over = np.int64(0)
            for j in range(16):
                slot = gl * 16 + j
                for h in range(2):                    # even element, odd element
                    a = np.float64(x[r, g * 32 + 2 * j + h]) * inv
                    if abs(a) >= 2.0 ** 23:
                        return False
                    c = np.int64(a)
                    words[b, slot // 4] -= 12 * c
                    d0 = ((c + 128) & 255) - 128      # signed base-256 digits
                    c1 = (c - d0) >> 8
                    d1 = ((c1 + 128) & 255) - 128
                    c2 = (c1 - d1) >> 8
                    d2 = ((c2 + 128) & 255) - 128
                    over |= (c2 - d2) >> 8            # nonzero: three digits do not hold c
                    if c2 != 0:
                        big[b] = True
                    o = 64 + 64 * h + slot
                    blocks[b, o] = d0 & 255
                    blocks[b, o + 128] = d1 & 255
                    blocks[b, o + 256] = d2 & 255
            if over != 0:
                return False
        k = 0
        for b in range(nfull):
            if not big[b]:
                order[k] = b
                k += 1
        n2 = k
        for b in range(nfull):
            if big[b]:
                order[k] = b
                k += 1
        for b in range(nfull, nb):
            order[k] = b
            k += 1
        row_i = oi[r]
        row_b = ob[r]
        row_i[0] = n2
        row_i[1] = nfull
        for b in range(nb):
            row_i[2 + b] = order[b]
        for b in range(2 + nb, header):
            row_i[b] = 0
        base = header * 4
        for b in range(nb):
            src = order[b]
            row_b[base + b * INT_BLOCK: base + (b + 1) * INT_BLOCK] = blocks[src]
    return True


@njit(cache=True, boundscheck=False)
def bf16_exact_rows(x):
    """True when every value of x is a bf16 value (low 16 bits zero)."""
    acc = np.uint32(0)
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            acc |= f32_bits(x[r, i]) & np.uint32(0xFFFF)
    return acc == 0


@njit(cache=True, boundscheck=False)
def terms_rows(x, idx, per, nt, out16):
    """out16 uint16 [n, L1*nt] = x gathered by idx (-1 = 0), split into nt bf16 terms
    (round to nearest even, remainder carried), laid out [chunk of `per`][term][per]."""
    n = x.shape[0]
    L1 = idx.size
    for r in range(n):
        for c in range(L1 // per):
            for j in range(per):
                e = idx[c * per + j]
                rem = x[r, e] if e >= 0 else np.float32(0)
                for t in range(nt):
                    u = f32_bits(rem)
                    b = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                    out16[r, (c * nt + t) * per + j] = b
                    rem = np.float32(rem - bits_f32(b << np.uint32(16)))


@njit(cache=True, boundscheck=False)
def bf16_gather_rows(x, idx, out16):
    """terms_rows with one term, for x whose values are all bf16 (bf16_exact_rows): the
    layout is then plain slot order and each word is the high half of x's bits."""
    for r in range(x.shape[0]):
        for j in range(idx.size):
            e = idx[j]
            out16[r, j] = (f32_bits(x[r, e]) >> np.uint32(16)) if e >= 0 else 0


@njit(cache=True, boundscheck=False)
def gather_rows(x, idx, scale, out):
    """out [n, L] = x[:, idx] * scale (idx -1 = 0)."""
    n = x.shape[0]
    for r in range(n):
        for j in range(idx.size):
            e = idx[j]
            out[r, j] = x[r, e] * scale if e >= 0 else np.float32(0)
