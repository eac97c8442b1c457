"""Bit reinterpretation between float32 and uint32 inside Numba code (Numba has no scalar view)."""
from __future__ import annotations

from llvmlite import ir
from numba import types
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
