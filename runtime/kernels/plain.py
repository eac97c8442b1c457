"""Plain-Numba row kernels (the 'numba' variant, last in the fallback chain) and `row_block`,
the one call every driver makes: row_block(isa, fmt, ...) with a constant isa resolves at
compile time to the IR kernel of that ISA or to the plain kernel here.

The plain kernels take x in natural order; fp8 expects x * 2^60 (the sign-extend decode
yields e4m3 * 2^-120 and the 2^60 comes back at the end of the row, as in the AVX2 kernel).
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from dsv4.quant.formats import E2M1_VALUES

from .bits import bits_f32
from .ir import MODULES, ir_rows

F32 = np.float32
FP8_X_SCALE = 2.0 ** 60
FAST = {"contract", "reassoc", "nsz"}     # vectorizable float32 sums; NaN/inf semantics kept
_E2M1 = E2M1_VALUES.copy()


@intrinsic
def _as_ptr(typingctx, addr, dtype):
    """uint64 address -> typed pointer (dtype given as a Numba number class)."""
    elem = dtype.instance_type if isinstance(dtype, types.NumberClass) else dtype.dtype
    sig = types.CPointer(elem)(types.uint64, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
    return sig, codegen


@njit(inline="always")
def e8m0(b):
    if b == 0:
        return bits_f32(np.uint32(0x00400000))
    if b == 255:
        return F32(np.nan)
    return bits_f32(np.uint32(b) << np.uint32(23))


@njit(fastmath=FAST, boundscheck=False)
def fp4_rows(w, s, x, y, nrows, K):
    ng = K // 32
    W = carray(_as_ptr(w, np.uint8), (nrows, ng * 16))
    S = carray(_as_ptr(s, np.uint8), (nrows, ng))
    X = carray(_as_ptr(x, np.float32), K)
    Y = carray(_as_ptr(y, np.float32), nrows)
    for r in range(nrows):
        acc = F32(0)
        for g in range(ng):
            t = F32(0)
            for j in range(16):
                b = W[r, 16 * g + j]
                t += _E2M1[b & 15] * X[32 * g + 2 * j] + _E2M1[b >> 4] * X[32 * g + 2 * j + 1]
            acc += t * e8m0(S[r, g])
        Y[r] = acc


@njit(fastmath=FAST, boundscheck=False)
def fp8_rows(w, s, x, y, nrows, K, row0, b0, b1, scols):
    W = carray(_as_ptr(w, np.uint8), (nrows, K))
    X = carray(_as_ptr(x, np.float32), K)
    Y = carray(_as_ptr(y, np.float32), nrows)
    for r in range(nrows):
        srow = carray(_as_ptr(s + np.uint64(((row0 + r) // b0) * scols), np.uint8), scols)
        acc = F32(0)
        for t in range((K + b1 - 1) // b1):
            row = W[r, t * b1:min(K, (t + 1) * b1)]
            xt = X[t * b1:min(K, (t + 1) * b1)]
            tmp = F32(0)
            for i in range(row.size):   # int32(int8(b)) << 20 & 0x87F00000 = e4m3 * 2^-120
                u = np.uint32(np.int32(np.int8(row[i])) << np.int32(20)) & np.uint32(0x87F00000)
                tmp += bits_f32(u) * xt[i]
            acc += tmp * e8m0(srow[t])
        Y[r] = acc * F32(FP8_X_SCALE)


@njit(fastmath=FAST, boundscheck=False)
def float_rows(w, x, y, nrows, K, bf16):
    X = carray(_as_ptr(x, np.float32), K)
    Y = carray(_as_ptr(y, np.float32), nrows)
    for r in range(nrows):
        acc = F32(0)
        if bf16:
            row = carray(_as_ptr(w + np.uint64(2 * r * K), np.uint16), K)
            for i in range(K):
                acc += bits_f32(np.uint32(row[i]) << np.uint32(16)) * X[i]
        else:
            rowf = carray(_as_ptr(w + np.uint64(4 * r * K), np.float32), K)
            for i in range(K):
                acc += rowf[i] * X[i]
        Y[r] = acc


def row_block(isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols):
    """y[0:nrows] = rows . x for the rows at w (see ir.SIGNATURE); isa, fmt constants."""
    raise NotImplementedError("row_block is only callable from Numba-compiled code")


@overload(row_block, prefer_literal=True)
def _row_block(isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols):
    if not (isinstance(isa, types.StringLiteral) and isinstance(fmt, types.StringLiteral)):
        raise TypingError("row_block: isa and fmt must be string constants")
    if isa.literal_value in MODULES:
        def impl(isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols):
            ir_rows(isa, fmt, np.uint64(w), np.uint64(s), np.uint64(x), np.uint64(y), np.int64(nrows),
                    np.int64(K), np.int64(nterms), np.int64(row0), np.int64(b0), np.int64(b1), np.int64(scols))
        return impl
    if isa.literal_value != "numba":
        raise TypingError(f"row_block: unknown isa {isa.literal_value!r}")
    kind = fmt.literal_value
    if kind == "fp4":
        return lambda isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols: \
            fp4_rows(np.uint64(w), np.uint64(s), np.uint64(x), np.uint64(y), nrows, K)
    if kind == "fp8":
        return lambda isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols: \
            fp8_rows(np.uint64(w), np.uint64(s), np.uint64(x), np.uint64(y), nrows, K, row0, b0, b1, scols)
    bf16 = kind == "bf16"
    return lambda isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols: \
        float_rows(np.uint64(w), np.uint64(x), np.uint64(y), nrows, K, bf16)
