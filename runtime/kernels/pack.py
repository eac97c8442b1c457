"""A tuple of arrays and constants held on the compiled side: one argument instead of many.

A compiled function called from Python type-checks and unboxes every array it is given,
one by one, and builds nothing faster than Python can assemble the tuples. For the decoded
block (decode_layer.py) that was ~170 arrays per layer call, 16 calls per token, and in
place, between weight streams that evict Python's objects from the caches, ~150 us per
call. A `Pack` (a Numba structref) carries such a tuple once built: passing it costs one
unboxing, and compiled code reads `pack.args` as the tuple. The arrays stay referenced by
the pack, so they live as long as it does.

`Pack(args)` builds one through a compiled, disk-cached constructor (the structref
default compiles one in every process, ~0.2 s per argument type).
"""
from __future__ import annotations

from numba import njit, types
from numba.experimental import structref


@structref.register
class PackType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class Pack(structref.StructRefProxy):
    """Holds one tuple, `args`, for compiled code."""

    def __new__(cls, args: tuple):
        return _make(args)


structref.define_proxy(Pack, PackType, ["args"])


@njit(cache=True)
def _make(args):
    return Pack(args)
