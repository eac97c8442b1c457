"""Per-token preparation of x in Numba (the layouts of prep.py, same bytes).

Decode prepares x for every gemv call; the NumPy versions cost 20-500 microseconds per
call in small-array overhead, these a few.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import bits_f32, f32_bits

INT_BLOCK = 512


TWO_DIGITS = (-32896, 32639)          # what two signed base-256 digits hold
THREE_DIGITS = (-8421504, 8355711)    # and three


@njit(inline="always")
def _lsb(u):
    """Exponent of the lowest set bit of the float32 with bits u (v = odd * 2^lsb); 999 for
    zero. Branch-free, so the loops over a group vectorize."""
    a = u & np.uint32(0x7FFFFFFF)
    e = np.int32(a >> np.uint32(23))
    m = np.int32(a & np.uint32(0x7FFFFF)) | (np.int32(0x800000) if e > 0 else np.int32(0))
    low = m & -m                                  # lowest set bit, a power of two < 2^24
    tz = np.int32(f32_bits(np.float32(low)) >> np.uint32(23)) - np.int32(127)
    return max(e, np.int32(1)) - np.int32(150) + tz if a != 0 else np.int32(999)


@njit(cache=True, boundscheck=False)
def fp4_int_rows(x, header, out):
    """x float32 [n, K] -> out float32 [n, L] (header int32 words, then 512-byte blocks).
    Returns False when some 32-group does not fit (then nothing is usable). Per row, in
    passes that vectorize: the groups' exponents E, the integers c = x * 2^-E, then per
    block its range, corrections, digit planes and factors."""
    n, K = x.shape
    ng = K // 32
    nb = (ng + 3) // 4
    nfull = ng // 4
    blocks = np.zeros((nb, INT_BLOCK), np.uint8)
    words = blocks.view(np.int32)                   # [nb, 128]: words 0-15 the corrections
    ex = np.empty(nb * 4, np.int32)
    inv = np.empty(nb * 4, np.float32)
    c = np.zeros(nb * 128, np.int32)
    big = np.zeros(nb, np.bool_)
    order = np.empty(nb, np.int64)
    ob = out.view(np.uint8)
    oi = out.view(np.int32)
    for r in range(n):
        blocks[:] = 0
        xr, ur = x[r], x[r].view(np.uint32)
        for g in range(nb * 4):
            E = np.int32(999)
            top = np.uint32(0)                      # largest |x| of the group, as bits
            if g < ng:
                ug = ur[g * 32:g * 32 + 32]
                for i in range(32):
                    E = min(E, _lsb(ug[i]))
                for i in range(32):
                    top = max(top, ug[i] & np.uint32(0x7FFFFFFF))
            if E == 999:
                E = np.int32(0)
            if E - 1 < -126 or E - 1 > 127:
                return False
            # |c| = |x| * 2^-E < 2^23, i.e. |x| < 2^(E + 23) (always, if that is not finite)
            lim = E + 23 + 127
            if top >= np.uint32(0x7F800000) or (lim < 255 and top >= np.uint32(lim) << np.uint32(23)):
                return False
            ex[g] = E
            inv[g] = bits_f32(np.uint32(127 - E) << np.uint32(23)) if E < 127 else np.float32(2.0 ** -127)
        for g in range(ng):                         # exact: x * 2^-E is an integer
            xg, cg, v = xr[g * 32:g * 32 + 32], c[g * 32:g * 32 + 32], inv[g]
            for i in range(32):
                cg[i] = np.int32(xg[i] * v)
        lo = np.int32(0)
        hi = np.int32(0)
        for b in range(nb):
            cb, bl = c[b * 128:b * 128 + 128], blocks[b]
            blo = np.int32(0)
            bhi = np.int32(0)
            for i in range(128):
                blo = min(blo, cb[i])
                bhi = max(bhi, cb[i])
            big[b] = blo < TWO_DIGITS[0] or bhi > TWO_DIGITS[1]
            lo, hi = min(lo, blo), max(hi, bhi)
            for lane in range(16):                  # -12 * sum of c over the lane's 8 elements
                s = np.int32(0)
                for i in range(8):
                    s += cb[8 * lane + i]
                words[b, lane] = -12 * s
            for j in range(64):                     # signed digits: even, odd elements
                for h in range(2):
                    cc = cb[2 * j + h]
                    d0 = ((cc + 128) & 255) - 128
                    c1 = (cc - d0) >> 8
                    d1 = ((c1 + 128) & 255) - 128
                    d2 = (c1 - d1) >> 8             # the third digit (c within THREE_DIGITS)
                    bl[64 + 64 * h + j] = np.uint8(d0 & 255)
                    bl[192 + 64 * h + j] = np.uint8(d1 & 255)
                    bl[320 + 64 * h + j] = np.uint8(d2 & 255)
            for gl in range(4):                     # 4 copies of each group's factor 2^(E-1)
                fb = np.int32(np.uint32(ex[4 * b + gl] - 1 + 127) << np.uint32(23))
                for q in range(4):
                    words[b, 112 + gl * 4 + q] = fb
        if lo < THREE_DIGITS[0] or hi > THREE_DIGITS[1]:
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
            row_b[base + b * INT_BLOCK: base + (b + 1) * INT_BLOCK] = blocks[order[b]]
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
