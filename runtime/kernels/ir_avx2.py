"""AVX2 + FMA kernels (any x86-64 of the last decade: Zen 1-3, Haswell and later).

Weights are decoded to float32 in registers and multiplied with ymm FMAs; x comes from the
prepare step, permuted to the order the decode produces and pre-scaled by a power of two:
- fp4: 32 packed bytes = two 32-groups; vpshufb maps nibbles to int8 2*e2m1 values.
  Integer path (x in the prep.fp4_int layout, nterms 0: e4m3-quantized activations):
  vpmaddubsw/vpmaddwd of the unsigned bytes 2*e2m1 + 12 against the signed digits of the
  per-group integers, plus the layout's correction; the weight blocks are taken in order
  although the layout lists two-digit blocks first (see ir_avx512_int.py). A row whose e8m0
  scales are all in 1..254 (checked per row) builds 2^(s-127) as s << 23 with one vpshufb
  and a shift instead of converting each scale byte (1.2x from cache on Zen 3).
  Float path (any x): each int8 is moved to the top byte of a dword (value * 2^24 after
  vcvtdq2ps); x holds x * 2^-25, so products are e2m1 * x exactly; per-pair sums times the
  two e8m0 scales.
- fp8: sign-extend decode `(int32(int8 b) << 20) & 0x87F00000` = e4m3 * 2^-120, done with
  16-bit arithmetic shifts on both bytes of a word at once (5 shifts per 32 bytes instead
  of 7: on Zen 3 shifts share two pipes with the shuffles); x holds x * 2^60, the row
  result is multiplied by 2^60 at the end.
- bf16: dword d holds words 2i, 2i+1: (d << 16) and (d & 0xFFFF0000) are the two floats.
K tails that do not fill a vector are done with scalar code (never reading past a row).
The fp4 integer and fp8 rows prefetch one line per 64 weight bytes, 16 KB ahead: on the
Xeon of docs/performance.md the hardware prefetcher alone left them at 3-6 GB/s from memory.
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.formats import E2M1_VALUES

from . import ir_attn, ir_dequant
from .irgen import Fn, Prefetch, choose, counted_loop, fp4_int_in_order, splat, vec

Y = "<8 x float>"
I = "<8 x i32>"
DECLS_FLOAT = f"""
declare {Y} @llvm.fma.v8f32({Y}, {Y}, {Y})
declare float @llvm.fma.f32(float, float, float)
declare float @llvm.vector.reduce.fadd.v8f32(float, {Y})
"""
DECLS = DECLS_FLOAT + """
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <32 x i8> @llvm.umax.v32i8(<32 x i8>, <32 x i8>)
declare i8 @llvm.vector.reduce.umax.v32i8(<32 x i8>)
"""
FP4_X_SCALE = 2.0 ** -25
INT_DIGITS, INT_FACTORS = 64, 448     # byte offsets in a 512-byte int-mode x block (prep.py)
FP8_X_SCALE = 2.0 ** 60
PREFETCH = 16384                      # software prefetch distance (bytes) of the rows (prefetcht1)
ROW_PREFETCH = Prefetch(PREFETCH, 2)
SCALE_AHEAD = 8                       # fp4: the e8m0 scales of the row this many rows ahead are prefetched


# ------------------------------------------------------------------ layouts (shared with prep)
def fp4_pair_elements() -> np.ndarray:
    """[64] -> (group offset 0/1, element 0..31) flattened as 32*g + e, for x' slot i of a pair."""
    i = np.arange(64)
    v, k = i // 8, i % 8
    h, b = v // 4, v % 4
    return 32 * (k // 4) + 2 * (4 * (k % 4) + b) + h


def fp8_chunk_elements() -> np.ndarray:
    i = np.arange(32)
    return 4 * (i % 8) + i // 8


def bf16_chunk_elements() -> np.ndarray:
    i = np.arange(16)
    return 2 * (i % 8) + i // 8


def _fma(f: Fn, a, b, c) -> str:
    return f(f"call {Y} @llvm.fma.v8f32({Y} {a}, {Y} {b}, {Y} {c})")


def _hsum(f: Fn, accs: list[str]) -> str:
    s = accs[0]
    for a in accs[1:]:
        s = f(f"fadd {Y} {s}, {a}")
    return f(f"call float @llvm.vector.reduce.fadd.v8f32(float 0.0, {Y} {s})")


# ------------------------------------------------------------------ fp4
def _fp4_pair(f: Fn, b32: str, xp: str) -> str:
    """32 packed bytes (two groups) . 64 prepared x -> <8 x float> (lanes 0-3 / 4-7 per group)."""
    tbl = vec("i8", [int(2 * v) for v in E2M1_VALUES] * 2)
    lo = f(f"and <32 x i8> {b32}, {splat('i8', 32, 15)}")
    hw = f(f"lshr <16 x i16> {f(f'bitcast <32 x i8> {b32} to <16 x i16>')}, {splat('i16', 16, 4)}")
    hi = f(f"and <32 x i8> {f(f'bitcast <16 x i16> {hw} to <32 x i8>')}, {splat('i8', 32, 15)}")
    top = splat("i32", 8, -16777216)
    vs = []
    for nib in (lo, hi):
        v = f(f"call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> {tbl}, <32 x i8> {nib})")
        v = f(f"bitcast <32 x i8> {v} to {I}")
        for b in range(4):
            t = v if b == 3 else f(f"shl {I} {v}, {splat('i32', 8, 24 - 8 * b)}")
            if b:
                t = f(f"and {I} {t}, {top}")
            vs.append(f(f"sitofp {I} {t} to {Y}"))
    xs = [f(f"load {Y}, ptr {f.gep('float', xp, 8 * j)}, align 4") for j in range(8)]
    ta = f(f"fmul {Y} {vs[0]}, {xs[0]}")
    tb = f(f"fmul {Y} {vs[4]}, {xs[4]}")
    for j in range(1, 4):
        ta, tb = _fma(f, vs[j], xs[j], ta), _fma(f, vs[4 + j], xs[4 + j], tb)
    return f(f"fadd {Y} {ta}, {tb}")


def _fp4_row() -> str:
    f = Fn("define internal float @avx2_fp4_row(ptr %w, ptr %s, ptr %x, i64 %ng) alwaysinline")
    npairs = f("lshr i64 %ng, 1")

    def pair(f, p, acc):
        b32 = f(f"load <32 x i8>, ptr {f.gep('i8', '%w', f(f'shl i64 {p}, 5'))}, align 1")
        d = _fp4_pair(f, b32, f.gep("float", "%x", f(f"shl i64 {p}, 6")))
        sp = f.gep("i8", "%s", f(f"shl i64 {p}, 1"))
        s0 = f.e8m0(f(f"load i8, ptr {sp}"))
        s1 = f.e8m0(f(f"load i8, ptr {f.gep('i8', sp, 1)}"))
        sv = f(f"insertelement {Y} {f(f'insertelement {Y} poison, float {s0}, i64 0')}, float {s1}, i64 4")
        sv = f(f"shufflevector {Y} {sv}, {Y} poison, <8 x i32> {vec('i32', [0] * 4 + [4] * 4)}")
        return [_fma(f, d, sv, acc[0])]
    (acc,) = counted_loop(f, npairs, pair, [(Y, "zeroinitializer")], "pair")
    pre = f.block
    f.cbr(f(f"icmp ne i64 {f('and i64 %ng, 1')}, 0"), "%odd", "%oddx")
    f.label("odd")                                      # lone last group: both lanes halves = it,
    last = f("sub i64 %ng, 1")                          # x' of the phantom half is zero
    h = f(f"load <16 x i8>, ptr {f.gep('i8', '%w', f(f'shl i64 {last}, 4'))}, align 1")
    b32 = f(f"shufflevector <16 x i8> {h}, <16 x i8> poison, <32 x i32> {vec('i32', [i % 16 for i in range(32)])}")
    d = _fp4_pair(f, b32, f.gep("float", "%x", f(f"shl i64 {npairs}, 6")))
    sv = f.splat("float", 8, f.e8m0(f(f"load i8, ptr {f.gep('i8', '%s', last)}")))
    acc2 = _fma(f, d, sv, acc)
    f.br("%oddx")
    f.label("oddx")
    acc = f.merge(Y, [(acc, pre), (acc2, "%odd")])
    f.put(f"ret float {_hsum(f, [acc])}")
    return f.end()


def _fp4_int_pair(f: Fn, b32: str, xb: str, planes: int) -> str:
    """Integer path, two groups: correction + sum((2*e2m1 + 12) * digits) as <8 x float>."""
    tbl = vec("i8", [int(2 * v) + 12 for v in E2M1_VALUES] * 2)
    lo = f(f"and <32 x i8> {b32}, {splat('i8', 32, 15)}")
    hw = f(f"lshr <16 x i16> {f(f'bitcast <32 x i8> {b32} to <16 x i16>')}, {splat('i16', 16, 4)}")
    hi = f(f"and <32 x i8> {f(f'bitcast <16 x i16> {hw} to <32 x i8>')}, {splat('i8', 32, 15)}")
    ws = [f(f"call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> {tbl}, <32 x i8> {n})") for n in (lo, hi)]
    t = f(f"load {I}, ptr {xb}, align 4")                     # the layout's correction
    for d in range(planes):
        m = []
        for h in range(2):               # unsigned weight bytes times signed digits
            dv = f(f"load <32 x i8>, ptr {f.gep('i8', xb, INT_DIGITS + 128 * d + 64 * h)}, align 1")
            m.append(f(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> {ws[h]}, <32 x i8> {dv})"))
        m = f(f"add <16 x i16> {m[0]}, {m[1]}")
        mul = splat("i16", 16, 1 if d == 0 else 256)
        q = f(f"call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {m}, <16 x i16> {mul})")
        if d == 2:
            q = f(f"shl {I} {q}, {splat('i32', 8, 8)}")
        t = f(f"add {I} {t}, {q}")
    return f(f"sitofp {I} {t} to {Y}")


def _fp4_int_half(f: Fn, w: str, s: str, xblk: str, p: str, o: str, half: int, acc: str, planes: int,
                  fast_scales: str | None = None) -> str:
    """acc + groups 4o + 2half (+1) of one row (x block p, its half `half`). fast_scales: the
    row's four e8m0 bytes of the block broadcast to every dword (<32 x i8>), all of them in
    1..254, so that 2^(s-127) is s << 23: one vpshufb puts s at bit 24 of its lanes, a shift
    by one does the rest. Without it, any e8m0 value, converted one at a time."""
    g = f(f"add i64 {f(f'shl i64 {o}, 2')}, {2 * half}")
    wp = f.gep("i8", w, f(f"shl i64 {g}, 4"))
    if half == 0:                                     # one line per 64-byte block
        ROW_PREFETCH.put(f, wp)
    b32 = f(f"load <32 x i8>, ptr {wp}, align 1")
    xb = f.gep("i8", xblk, f(f"add i64 {f(f'shl i64 {p}, 9')}, {32 * half}"))
    d = _fp4_int_pair(f, b32, xb, planes)
    if fast_scales is None:
        sp = f.gep("i8", s, g)
        s0 = f.e8m0(f(f"load i8, ptr {sp}"))
        s1 = f.e8m0(f(f"load i8, ptr {f.gep('i8', sp, 1)}"))
        sv = f(f"insertelement {Y} {f(f'insertelement {Y} poison, float {s0}, i64 0')}, float {s1}, i64 4")
        sv = f(f"shufflevector {Y} {sv}, {Y} poison, <8 x i32> {vec('i32', [0] * 4 + [4] * 4)}")
    else:
        ctrl = vec("i8", [-128, -128, -128, 2 * half] * 4 + [-128, -128, -128, 2 * half + 1] * 4)
        e = f(f"call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> {fast_scales}, <32 x i8> {ctrl})")
        e = f(f"lshr {I} {f(f'bitcast <32 x i8> {e} to {I}')}, {splat('i32', 8, 1)}")
        sv = f(f"bitcast {I} {e} to {Y}")
    xf = f(f"load {Y}, ptr {f.gep('i8', xb, INT_FACTORS)}, align 4")
    return _fma(f, d, f(f"fmul {Y} {sv}, {xf}"), acc)


def _fp4_int_row(fast: bool) -> str:
    """One row, x in the prep.fp4_int layout: header, then 4-group blocks, two-digit ones
    first (taken in weight order). fast: every scale byte of the row is in 1..254."""
    f = Fn(f"define internal float @avx2_fp4_int_row{'f' if fast else ''}(ptr %w, ptr %s, ptr %x, i64 %ng) "
           "alwaysinline")
    nb = f("lshr i64 " + f("add i64 %ng, 3") + ", 2")
    words = f(f"and i64 {f(f'add i64 {nb}, 17')}, -16")          # header: (2 + nb) -> 16k words
    xblk = f.gep("i8", "%x", f(f"shl i64 {words}, 2"))
    nfull = f("lshr i64 %ng, 2")

    def block(f, p, o, acc, planes):
        sd = None
        if fast:
            d = f(f"load i32, ptr {f.gep('i8', '%s', f(f'shl i64 {o}, 2'))}, align 1")
            sd = f(f"bitcast {I} {f.splat('i32', 8, d)} to <32 x i8>")
        a = _fp4_int_half(f, "%w", "%s", xblk, p, o, 0, acc[0], planes, sd)
        return [_fp4_int_half(f, "%w", "%s", xblk, p, o, 1, a, planes, sd)]
    (acc,) = fp4_int_in_order(f, "%x", nfull, block, [(Y, "zeroinitializer")])
    rem = f("and i64 %ng, 3")                           # partial last block: 1-3 groups
    pre = f.block
    f.cbr(f(f"icmp uge i64 {rem}, 2"), "%p2", "%p2x")
    f.label("p2")
    acc2 = _fp4_int_half(f, "%w", "%s", xblk, nfull, nfull, 0, acc, 3)
    f.br("%p2x")
    f.label("p2x")
    acc = f.merge(Y, [(acc, pre), (acc2, "%p2")])
    pre = f.block
    f.cbr(f(f"icmp ne i64 {f(f'and i64 {rem}, 1')}, 0"), "%p1", "%p1x")
    f.label("p1")
    half = f(f"lshr i64 {rem}, 1")
    g = f(f"add i64 {f(f'shl i64 {nfull}, 2')}, {f(f'shl i64 {half}, 1')}")
    h = f(f"load <16 x i8>, ptr {f.gep('i8', '%w', f(f'shl i64 {g}, 4'))}, align 1")
    b32 = f(f"shufflevector <16 x i8> {h}, <16 x i8> poison, <32 x i32> {vec('i32', [i % 16 for i in range(32)])}")
    xb = f.gep("i8", xblk, f(f"add i64 {f(f'shl i64 {nfull}, 9')}, {f(f'shl i64 {half}, 5')}"))
    d = _fp4_int_pair(f, b32, xb, 3)
    s0 = f.e8m0(f(f"load i8, ptr {f.gep('i8', '%s', g)}"))
    sv = f(f"shufflevector {Y} {f(f'insertelement {Y} zeroinitializer, float {s0}, i64 0')}, {Y} zeroinitializer, "
           f"<8 x i32> {vec('i32', [0] * 4 + [8] * 4)}")
    xf = f(f"load {Y}, ptr {f.gep('i8', xb, INT_FACTORS)}, align 4")
    acc3 = _fma(f, d, f(f"fmul {Y} {sv}, {xf}"), acc)
    f.br("%p1x")
    f.label("p1x")
    acc = f.merge(Y, [(acc, pre), (acc3, "%p1")])
    f.put(f"ret float {_hsum(f, [acc])}")
    return f.end()


def _scale_normal() -> str:
    """i1 @avx2_e8m0_normal(ptr s, i64 n): every byte in 1..254 (2^(b-127) is then b << 23)."""
    f = Fn("define internal i1 @avx2_e8m0_normal(ptr %s, i64 %n) alwaysinline")
    V = "<32 x i8>"

    def step(f, c, acc):                   # the largest b - 1 (0 wraps to 255) must be <= 253
        b = f(f"load {V}, ptr {f.gep('i8', '%s', f(f'shl i64 {c}, 5'))}, align 1")
        b1 = f(f"sub {V} {b}, {splat('i8', 32, 1)}")
        return [f(f"call {V} @llvm.umax.v32i8({V} {acc[0]}, {V} {b1})")]
    (acc,) = counted_loop(f, f("lshr i64 %n, 5"), step, [(V, "zeroinitializer")], "e")
    top = f(f"call i8 @llvm.vector.reduce.umax.v32i8({V} {acc})")
    off = f("and i64 %n, -32")

    def tail(f, i, m):
        bp = f.gep("i8", "%s", f(f"add i64 {off}, {i}"))
        b1 = f(f"sub i8 {f(f'load i8, ptr {bp}')}, 1")
        return [f(f"select i1 {f(f'icmp ugt i8 {b1}, {m[0]}')}, i8 {b1}, i8 {m[0]}")]
    (top,) = counted_loop(f, f("and i64 %n, 31"), tail, [("i8", top)], "et")
    f.put(f"ret i1 {f(f'icmp ule i8 {top}, -3')}")
    return f.end()


# ------------------------------------------------------------------ fp8
def _fp8_row() -> str:
    f = Fn("define internal float @avx2_fp8_row(ptr %w, ptr %srow, ptr %x, i64 %K, i64 %b1) alwaysinline")
    ntiles = f("udiv i64 " + f("add i64 %K, " + f("sub i64 %b1, 1")) + ", %b1")
    mask = splat("i32", 8, -2014314496)                 # 0x87F00000

    cpt = f("lshr i64 " + f("add i64 %b1, 31") + ", 5")      # x' chunks per tile

    def tile(f, t, accs):
        k0 = f(f"mul i64 {t}, %b1")
        left = f(f"sub i64 %K, {k0}")
        ln = f(f"select i1 {f(f'icmp slt i64 {left}, %b1')}, i64 {left}, i64 %b1")
        x0 = f(f"shl i64 {f(f'mul i64 {t}, {cpt}')}, 5")   # tile's first x' slot

        def chunk(f, c, tmp):
            off = f(f"shl i64 {c}, 5")
            d = f(f"load {I}, ptr {f.gep('i8', '%w', f(f'add i64 {k0}, {off}'))}, align 1")
            xp = f.gep("float", "%x", f(f"add i64 {x0}, {off}"))
            out = list(tmp)
            # 16-bit arithmetic shifts decode the high byte of both words at once (5 shifts
            # for the 4 bytes instead of 7): bytes 3 and 1 from d, bytes 2 and 0 from d << 8
            w16 = f(f"bitcast {I} {d} to <16 x i16>")
            four, eight = splat("i16", 16, 4), splat("i16", 16, 8)
            words = [f(f"ashr <16 x i16> {f(f'shl <16 x i16> {w16}, {eight}')}, {four}"),
                     f(f"ashr <16 x i16> {w16}, {four}")]
            for p in range(4):
                t = f(f"bitcast <16 x i16> {words[p % 2]} to {I}")
                if p < 2:
                    t = f(f"shl {I} {t}, {splat('i32', 8, 16)}")
                t = f(f"and {I} {t}, {mask}")
                wv = f(f"bitcast {I} {t} to {Y}")
                out[p % 2] = _fma(f, wv, f(f"load {Y}, ptr {f.gep('float', xp, 8 * p)}, align 4"), out[p % 2])
            return out

        def line(f, i, tmp):                             # two chunks, one prefetch per 64 bytes
            c = f(f"shl i64 {i}, 1")
            off = f(f"add i64 {k0}, {f(f'shl i64 {c}, 5')}")
            ROW_PREFETCH.put(f, f.gep("i8", "%w", off))
            return chunk(f, f(f"add i64 {c}, 1"), chunk(f, c, tmp))
        ta, tb = counted_loop(f, f(f"lshr i64 {ln}, 6"), line, [(Y, "zeroinitializer")] * 2, "ln")
        odd = f(f"and i64 {f(f'lshr i64 {ln}, 5')}, 1")     # a last lone chunk (0 or 1)
        last = f(f"lshr i64 {f(f'and i64 {ln}, -64')}, 5")
        ta, tb = counted_loop(f, odd, lambda f, i, tmp: chunk(f, last, tmp), [(Y, ta), (Y, tb)], "ch")
        tmp = f(f"fadd {Y} {ta}, {tb}")
        full = f(f"and i64 {ln}, -32")

        def scalar(f, i, s):                             # tile tail: natural-order x'
            k = f(f"add i64 {full}, {i}")
            wp = f.gep("i8", "%w", f(f"add i64 {k0}, {k}"))
            b = f(f"sext i8 {f(f'load i8, ptr {wp}')} to i32")
            b = f(f"and i32 {f(f'shl i32 {b}, 20')}, -2014314496")
            wv = f(f"bitcast i32 {b} to float")
            xv = f(f"load float, ptr {f.gep('float', '%x', f(f'add i64 {x0}, {k}'))}, align 4")
            return [f(f"call float @llvm.fma.f32(float {wv}, float {xv}, float {s[0]})")]
        (st,) = counted_loop(f, f(f"and i64 {ln}, 31"), scalar, [("float", "0.0")], "sc")
        tmp = f(f"fadd {Y} {tmp}, {f(f'insertelement {Y} zeroinitializer, float {st}, i64 0')}")
        sc = f.splat("float", 8, f.e8m0(f(f"load i8, ptr {f.gep('i8', '%srow', t)}")))
        return [_fma(f, tmp, sc, accs[0])]
    (acc,) = counted_loop(f, ntiles, tile, [(Y, "zeroinitializer")], "tile")
    f.put(f"ret float {f(f'fmul float {_hsum(f, [acc])}, 0x{np.float64(FP8_X_SCALE).view(np.uint64):X}')}")
    return f.end()


# ------------------------------------------------------------------ bf16 / f32
def float_row(fmt: str, pf: Prefetch = ROW_PREFETCH, unroll: int = 2) -> str:
    step = 16 if fmt == "bf16" else 8
    esz = 2 if fmt == "bf16" else 4
    per = step // 8
    f = Fn(f"define internal float @avx2_{fmt}_row(ptr %w, ptr %x, i64 %K) alwaysinline")

    def step_fn(f, k, accs):
        wp = f.gep("i8", "%w", f(f"mul i64 {k}, {step * esz}"))
        xp = f.gep("float", "%x", f(f"mul i64 {k}, {step}"))
        xs = [f(f"load {Y}, ptr {f.gep('float', xp, 8 * h)}, align 4") for h in range(per)]
        if fmt == "f32":
            wv = [f(f"load {Y}, ptr {wp}, align 4")]
        else:
            d = f(f"load {I}, ptr {wp}, align 2")
            ev = f(f"shl {I} {d}, {splat('i32', 8, 16)}")
            od = f(f"and {I} {d}, {splat('i32', 8, -65536)}")
            wv = [f(f"bitcast {I} {v} to {Y}") for v in (ev, od)]
        return [_fma(f, a, b, c) for a, b, c in zip(wv, xs, accs)]
    nfull = f(f"udiv i64 %K, {step}")

    def main(f, u, accs):
        out = []
        # a line per iteration (2 x 8 f32 or 2 x 16 bf16)
        pf.put(f, f.gep("i8", "%w", f(f"mul i64 {u}, {unroll * step * esz}")))
        for j in range(unroll):
            out += step_fn(f, f(f"add i64 {f(f'mul i64 {u}, {unroll}')}, {j}"), accs[j * per:(j + 1) * per])
        return out
    accs = counted_loop(f, f(f"udiv i64 {nfull}, {unroll}"), main, [(Y, "zeroinitializer")] * (per * unroll), "main")
    done = f(f"mul i64 {f(f'udiv i64 {nfull}, {unroll}')}, {unroll}")
    accs = counted_loop(f, f(f"sub i64 {nfull}, {done}"), lambda f, i, a: step_fn(f, f(f"add i64 {done}, {i}"), a),
                        [(Y, a) for a in accs[:per]], "rest") + accs[per:]
    k0 = f(f"mul i64 {nfull}, {step}")

    def scalar(f, i, s):                                 # K tail: natural-order x
        k = f(f"add i64 {k0}, {i}")
        if fmt == "f32":
            wv = f(f"load float, ptr {f.gep('float', '%w', k)}, align 4")
        else:
            wp = f.gep("i16", "%w", k)
            h = f(f"zext i16 {f(f'load i16, ptr {wp}, align 2')} to i32")
            wv = f(f"bitcast i32 {f(f'shl i32 {h}, 16')} to float")
        xv = f(f"load float, ptr {f.gep('float', '%x', k)}, align 4")
        return [f(f"call float @llvm.fma.f32(float {wv}, float {xv}, float {s[0]})")]
    (st,) = counted_loop(f, f(f"urem i64 %K, {step}"), scalar, [("float", "0.0")], "sc")
    f.put(f"ret float {f(f'fadd float {_hsum(f, accs)}, {st}')}")
    return f.end()


# ------------------------------------------------------------------ exported row-block kernels
def _export(fmt: str, call_row, isa: str = "avx2") -> str:
    f = Fn(f"define void @dsv4_{isa}_{fmt}(ptr %w, ptr %s, ptr %x, ptr %y, i64 %nrows, i64 %K, "
           "i64 %nterms, i64 %row0, i64 %b0, i64 %b1, i64 %scols)")

    def row(f, r, _):
        f.put(f"store float {call_row(f, r)}, ptr {f.gep('float', '%y', r)}, align 4")
        return []
    counted_loop(f, "%nrows", row, [], "rows")
    f.put("ret void")
    return f.end()


def module() -> str:
    def fp4(f, r):                      # nterms 0: integer path, else float path
        ng = f("lshr i64 %K, 5")
        off = f(f"mul i64 {r}, {ng}")
        sp = f.gep("i8", "%s", off)
        args = f"ptr {f.gep('i8', '%w', f(f'shl i64 {off}, 4'))}, ptr {sp}, ptr %x, i64 {ng}"

        def integer(f):                 # the scales are a stream of their own (1/16 of the weights)
            ROW_PREFETCH.span(f, f.gep("i8", sp, f(f"mul i64 {ng}, {SCALE_AHEAD}")), ng, "spf")
            normal = f(f"call i1 @avx2_e8m0_normal(ptr {sp}, i64 {ng})")
            return choose(f, normal, lambda f: f(f"call float @avx2_fp4_int_rowf({args})"),
                          lambda f: f(f"call float @avx2_fp4_int_row({args})"))
        return choose(f, f("icmp eq i64 %nterms, 0"), integer, lambda f: f(f"call float @avx2_fp4_row({args})"))

    def fp8(f, r):
        band = f(f"udiv i64 {f(f'add i64 %row0, {r}')}, %b0")
        srow = f.gep("i8", "%s", f(f"mul i64 {band}, %scols"))
        return f(f"call float @avx2_fp8_row(ptr {f.gep('i8', '%w', f(f'mul i64 {r}, %K'))}, ptr {srow}, "
                 "ptr %x, i64 %K, i64 %b1)")

    return "\n\n".join([DECLS, _fp4_row(), _fp4_int_row(False), _fp4_int_row(True), _scale_normal(), _fp8_row(),
                        _export("fp4", fp4), _export("fp8", fp8)] + float_kernels("avx2") + ir_dequant.functions()
                       + ir_attn.functions("avx2"))


def float_kernels(isa: str, formats=("bf16", "f32"), pf: Prefetch = ROW_PREFETCH) -> list[str]:
    """bf16 / f32 rows with ymm FMAs, exported as dsv4_{isa}_{fmt}; the AVX-512 module uses
    the f32 one too (on Zen 4 it streamed better than a zmm version), with its own `pf`."""
    def flt(fmt, esz):
        def call(f, r):
            off = f(f"mul i64 {f(f'mul i64 {r}, %K')}, {esz}")
            return f(f"call float @avx2_{fmt}_row(ptr {f.gep('i8', '%w', off)}, ptr %x, i64 %K)")
        return call
    decls = [] if isa == "avx2" else [DECLS_FLOAT]
    esz = {"bf16": 2, "f32": 4}
    return decls + [float_row(fmt, pf) for fmt in formats] + [_export(fmt, flt(fmt, esz[fmt]), isa) for fmt in formats]
