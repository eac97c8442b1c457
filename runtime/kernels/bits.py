"""Bit reinterpretation between float32 and uint32 inside Numba code (Numba has no scalar
view), and an atomic fetch-and-add for work sharing between the threads of a prange."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def bits_f32(typingctx, u):
    """uint32 bits -> float32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def f32_bits(typingctx, x):
    """float32 -> its uint32 bits."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """Atomically arr[i] += v for an int64 array; returns the old value (threads of one
    parallel region use it to hand out work)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "monotonic")
    return sig, codegen
