"""Hand-written LLVM IR kernels, linked into Numba's own code so that they are cached.

The kernel text (ir_avx2.py, ir_avx512.py) is parsed by llvmlite into a Numba code library,
once per process and ISA, and `ir_rows` (a Numba intrinsic) declares the kernel in the
calling function's module and links that library in. The IR thus ends up inside the
caller's object code, which Numba's `cache=True` stores and reloads like any other code:
a second process neither parses IR nor compiles anything. (Calling an MCJIT function
through a ctypes pointer would work too, but Numba refuses to cache such callers.)

Every exported kernel has one C signature (`SIGNATURE`) and computes, for `nrows`
consecutive rows starting at `w`, y[r] = row_r . x (x already prepared for the format).
Which ISA a caller uses is a compile-time string; a host lacking the ISA's features makes
that compilation fail (UnsupportedISA), which kernel selection treats as "not available".
"""
from __future__ import annotations

import functools

import llvmlite.binding as llb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from . import ir_amx, ir_attn, ir_avx2, ir_avx512, ir_dequant, ir_gemm  # noqa: F401 - ir_avx512 pulls in ir_avx512_int

FORMATS = ("fp4", "fp8", "bf16", "f32")
MODULES = {"avx512": ir_avx512.module, "avx2": ir_avx2.module}
REQUIRED = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512bf16", "avx512vnni", "fma"),
    "avx2": ("avx2", "fma"),
}
AMX = ("amx-tile", "amx-bf16")     # the avx512 module's tile kernel (ir_amx.py) needs these too
PARAMS = ir_gemm.PARAMS | ir_amx.PARAMS | ir_dequant.PARAMS | ir_attn.PARAMS   # other exported functions: kinds, 'p' = ptr
SIGNATURE = "(ptr w, ptr s, ptr x, ptr y, i64 nrows, i64 K, i64 nterms, i64 row0, i64 b0, i64 b1, i64 scols)"


class UnsupportedISA(RuntimeError):
    """The code generator's target lacks features an IR kernel needs."""


@functools.cache
def module_text(isa: str, amx: bool = False, cpu: str = "") -> str:
    """The ISA's module; `amx`: the target has AMX (the avx512 module then holds the AMX
    tile kernel instead of a trap); `cpu`: LLVM's name of the target CPU, which picks the
    avx512 weight streams' prefetch (Numba keys its cache on that name too)."""
    return ir_avx512.module(amx, ir_avx512.prefetch_for(cpu)) if isa == "avx512" else MODULES[isa]()


def has_amx(features) -> bool:
    return all(f in features for f in AMX)


def enabled_features(feature_string: str) -> frozenset[str]:
    """'+avx2,-avx512f,...' (LLVM feature string) -> {'avx2', ...}."""
    return frozenset(f[1:] for f in feature_string.split(",") if f.startswith("+"))


def missing_features(isa: str, features) -> tuple[str, ...]:
    return tuple(f for f in REQUIRED[isa] if f not in features)


@functools.cache
def _library(codegen, isa: str):
    features = enabled_features(codegen._tm_features)
    missing = missing_features(isa, features)
    if missing:
        raise UnsupportedISA(f"{isa} kernels need {', '.join(missing)}, absent on this target")
    lib = codegen.create_library(f"dsv4_ir_{isa}")
    mod = llb.parse_assembly(module_text(isa, has_amx(features), codegen._get_host_cpu_name()))
    mod.verify()
    lib.add_llvm_module(mod)
    lib.finalize()
    return lib


def literal_string(what: str, t) -> str:
    """The value of a Numba string-constant type (typing of the overloads that pick a kernel
    variant by name); a TypingError naming `what` for anything else."""
    if not isinstance(t, types.StringLiteral):
        raise TypingError(f"{what} must be a string constant, got {t}")
    return t.literal_value


@intrinsic(prefer_literal=True)
def ir_rows(typingctx, isa, fmt, w, s, x, y, nrows, K, nterms, row0, b0, b1, scols):
    """ir_rows('avx2', 'fp4', w, s, x, y, nrows, K, nterms, row0, b0, b1, scols): addresses
    as uint64, the rest int64; isa and fmt must be compile-time string constants."""
    for name, t, allowed in (("isa", isa, MODULES), ("fmt", fmt, FORMATS)):
        if not isinstance(t, types.StringLiteral) or t.literal_value not in allowed:
            raise TypingError(f"ir_rows: {name} must be a string constant in {tuple(allowed)}, got {t}")
    sig = types.void(isa, fmt, *[types.uint64] * 4, *[types.int64] * 7)

    def codegen(context, builder, sig, args):
        name = f"dsv4_{isa.literal_value}_{fmt.literal_value}"
        context.active_code_library.add_linking_library(_library(context.codegen(), isa.literal_value))
        ptr, i64 = ir.PointerType(), ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr] * 4 + [i64] * 7),
                                            name)
        builder.call(fn, [builder.inttoptr(a, ptr) for a in args[2:6]] + list(args[6:]))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic(prefer_literal=True)
def ir_call(typingctx, isa, name, args):
    """ir_call('avx512', 'dsv4_avx512_bf16_tile', (a, b, ...)): call a void function of the
    ISA's module whose parameters are ptr or i64 (PARAMS[name], 'p' / 'i'); every argument
    is an int64 or uint64 (addresses as integers); isa and name are string constants."""
    for what, t in (("isa", isa), ("name", name)):
        if not isinstance(t, types.StringLiteral):
            raise TypingError(f"ir_call: {what} must be a string constant, got {t}")
    kinds = PARAMS.get(name.literal_value)
    if isa.literal_value not in MODULES or kinds is None:
        raise TypingError(f"ir_call: no function {name.literal_value!r} in the {isa.literal_value!r} module")
    if not isinstance(args, types.BaseTuple) or len(args) != len(kinds) or \
            not all(isinstance(t, types.Integer) and t.bitwidth == 64 for t in args):
        raise TypingError(f"ir_call: {name.literal_value} takes a tuple of {len(kinds)} 64-bit integers")

    def codegen(context, builder, sig, cargs):
        context.active_code_library.add_linking_library(_library(context.codegen(), isa.literal_value))
        ptr, i64 = ir.PointerType(), ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr if k == "p" else i64 for k in kinds]),
            name.literal_value)
        vals = [builder.extract_value(cargs[2], i) for i in range(len(kinds))]
        builder.call(fn, [builder.inttoptr(v, ptr) if k == "p" else v for v, k in zip(vals, kinds)])
        return context.get_dummy_value()
    return types.void(isa, name, args), codegen


def assembly(isa: str, cpu: str | None = None, features: str | None = None) -> str:
    """The kernels' machine code (for inspection), optimized like Numba does (O3)."""
    llb.initialize_native_target()
    llb.initialize_native_asmprinter()
    target = llb.Target.from_default_triple()
    features = features if features is not None else llb.get_host_cpu_features().flatten()
    cpu = cpu or llb.get_host_cpu_name()
    tm = target.create_target_machine(cpu=cpu, features=features, opt=3)
    mod = llb.parse_assembly(module_text(isa, has_amx(enabled_features(features)), cpu))
    mod.verify()
    pb = llb.create_pass_builder(tm, llb.create_pipeline_tuning_options(3))
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)
