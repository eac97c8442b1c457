"""AVX-512 kernels (needs avx512f/bw/vl + VBMI + BF16 + VNNI: Zen 4/5, Sapphire Rapids on).

Quantized weights are decoded to *exact* bf16 with byte permutes and multiplied with
`vdpbf16ps` (32 products per instruction, float32 accumulation). x is pre-split by the
prepare step into `nterms` bf16 planes whose sum is x exactly (1 plane when x is already
bf16-exact, as e4m3-quantized activations are; 3 planes for any float32), so results match
the float32 reference to accumulation rounding.
- fp4 (nterms >= 1): vpmultishiftqb puts each nibble in both bytes of a word, vpermb maps
  it to the two bytes of bf16(e2m1); per 32-group result times the e8m0 scale (a per-row
  float buffer). With x in the integer layout (nterms 0, the usual case) the VNNI kernel of
  ir_avx512_int.py runs instead.
- fp8: two vpermi2b 128-entry tables give the low/high bytes of bf16(e4m3), sign OR-ed in,
  bytes interleaved to words; per-tile sum times the tile scale.
- bf16: the weight words go straight into `vdpbf16ps` against x' planes in natural order
  (x' [chunk of 32][term][32 words]); half the x traffic of a float32 x and no decode.
  For x that is not bf16-exact (nterms 0) the ymm kernel of ir_avx2.py with a float32 x
  (three planes would triple the x reads).
- f32 weights: the ymm kernel of ir_avx2.py (x as float32), which streamed better on Zen 4
  than a zmm version did.
Exported functions share one C signature (see ir.SIGNATURE).
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.formats import E2M1_VALUES, E4M3_VALUES

from . import ir_amx, ir_attn, ir_avx2, ir_avx512_int, ir_gemm
from .irgen import Fn, Prefetch, bf16_bits, by_nterms, choose, counted_loop, i8s, mask_first, splat, vec, vsum

Z = "<16 x float>"
BF = "<32 x bfloat>"
NTERMS = (1, 2, 3)
# The weight streams' software prefetch (irgen.Prefetch), chosen by the host CPU (LLVM's
# name, ir.py): prefetcht1 16 KB ahead, or prefetchnta 8 KB ahead where it was measured
# faster (Zen 5: docs/performance.md; on the Sapphire Rapids-class Xeon, which LLVM calls
# `rocketlake`, NTA was 2-3x slower).
PREFETCH_T1 = Prefetch(16384, 2)
PREFETCH_NTA = Prefetch(8192, 0)
NTA_CPUS = frozenset({"znver5"})
DECLS = f"""
declare <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8>, <64 x i8>)
declare <64 x i8> @llvm.x86.avx512.permvar.qi.512(<64 x i8>, <64 x i8>)
declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)
declare {Z} @llvm.x86.avx512bf16.dpbf16ps.512({Z}, {BF}, {BF})
declare {Z} @llvm.fma.v16f32({Z}, {Z}, {Z})
declare float @llvm.vector.reduce.fadd.v16f32(float, {Z})
declare <16 x i8> @llvm.masked.load.v16i8.p0(ptr, i32, <16 x i1>, <16 x i8>)
declare <64 x i8> @llvm.masked.load.v64i8.p0(ptr, i32, <64 x i1>, <64 x i8>)
declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)
declare <4 x i8> @llvm.masked.load.v4i8.p0(ptr, i32, <4 x i1>, <4 x i8>)
declare <64 x i8> @llvm.umax.v64i8(<64 x i8>, <64 x i8>)
declare i8 @llvm.vector.reduce.umax.v64i8(<64 x i8>)
declare i32 @llvm.vector.reduce.umin.v16i32(<16 x i32>)
declare i32 @llvm.vector.reduce.umax.v16i32(<16 x i32>)
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <32 x i32> @llvm.masked.load.v32i32.p0(ptr, i32, <32 x i1>, <32 x i32>)
declare i32 @llvm.vector.reduce.or.v32i32(<32 x i32>)
"""


# ------------------------------------------------------------------ layouts (shared with prep)
def fp4_word_elements() -> np.ndarray:
    """Element (0..31) of a 32-group held by bf16 word w of the decoded zmm."""
    w = np.arange(32)
    i, k = w // 4, w % 4
    return 16 * (i % 2) + 4 * (i // 2) + k


def fp8_word_elements() -> np.ndarray:
    """Element (0..63) of a 64-chunk held by word w of the two decoded zmm (A then B)."""
    w = np.arange(64)
    half, lw = w // 32, w % 32
    return 16 * (lw // 8) + 8 * half + lw % 8


# ------------------------------------------------------------------ constants
def _fp4_consts():
    bits = bf16_bits(E2M1_VALUES)                        # 16 codes -> bf16
    tbl = np.zeros(64, np.int64)
    tbl[:16] = bits >> 8                                 # index n      -> high byte
    tbl[32:48] = bits & 0xFF                             # index n | 32 -> low byte
    ctrl = []
    for i in range(8):                                   # output qword i <- source qword i % 2
        for k in range(4):
            off = 4 * ((i // 2) * 4 + k)
            ctrl += [off, off]
    return vec("i8", i8s(tbl)), vec("i8", ctrl)


def _fp8_tables():
    mags = E4M3_VALUES[:128].copy()
    mags[0x7F] = np.nan
    b = mags.view(np.uint32)
    bits = np.where(np.isnan(mags), 0x7FC0, b >> 16).astype(np.int64)
    if np.any(b[~np.isnan(mags)] & 0xFFFF):
        raise AssertionError("e4m3 not exact in bf16")
    lo, hi = bits & 0xFF, bits >> 8
    return [vec("i8", i8s(t)) for t in (lo[:64], lo[64:], hi[:64], hi[64:])]


# ------------------------------------------------------------------ fp4
def _fp4_group(f: Fn, w, x, buf, g, acc, nt, tbl, ctrl):
    wp = f.gep("i8", w, f(f"shl i64 {g}, 4"))
    h = f(f"load <16 x i8>, ptr {wp}, align 1")
    p = f(f"shufflevector <16 x i8> {h}, <16 x i8> poison, <64 x i32> {vec('i32', [i % 16 for i in range(64)])}")
    t = f(f"call <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8> {ctrl}, <64 x i8> {p})")
    t = f(f"and <64 x i8> {t}, {splat('i8', 64, 15)}")
    ix = f(f"or <64 x i8> {t}, {vec('i8', [32, 0] * 32)}")
    wb = f(f"call <64 x i8> @llvm.x86.avx512.permvar.qi.512(<64 x i8> {tbl}, <64 x i8> {ix})")
    wb = f(f"bitcast <64 x i8> {wb} to {BF}")
    xp = f.gep("i16", x, f(f"mul i64 {g}, {32 * nt}"))
    terms = []                                         # independent chains, summed after
    for j in range(nt):
        xb = f(f"load {BF}, ptr {f.gep('i16', xp, 32 * j)}, align 2")
        terms.append(f(f"call {Z} @llvm.x86.avx512bf16.dpbf16ps.512({Z} zeroinitializer, {BF} {wb}, {BF} {xb})"))
    s = vsum(f, terms)
    sc = f(f"load float, ptr {f.gep('float', buf, g)}, align 4")
    return f(f"call {Z} @llvm.fma.v16f32({Z} {s}, {Z} {f.splat('float', 16, sc)}, {Z} {acc})")


def _scales_to_buf(f: Fn, src: str, n: str, buf: str = "%buf", tag: str = "sc") -> None:
    """Decode the n e8m0 bytes at src into floats at buf, 16 per step (masked tail)."""
    def scales(f, c, _):
        off = f(f"shl i64 {c}, 4")
        m = mask_first(f, 16, f(f"sub i64 {n}, {off}"))
        b = f.masked_load("<16 x i8>", f.gep("i8", src, off), m)
        f.put(f"store <16 x float> {f.e8m0(b, 16)}, ptr {f.gep('float', buf, off)}, align 4")
        return []
    counted_loop(f, f("lshr i64 " + f(f"add i64 {n}, 15") + ", 4"), scales, [], tag)


def _fp4_row(nt: int, unroll: int = 4) -> str:
    tbl, ctrl = _fp4_consts()
    f = Fn(f"define internal float @avx512_fp4_row{nt}(ptr %w, ptr %s, ptr %x, i64 %ng, ptr %buf) alwaysinline")
    _scales_to_buf(f, "%s", "%ng")

    def main(f, u, accs):
        g0 = f(f"mul i64 {u}, {unroll}")
        return [_fp4_group(f, "%w", "%x", "%buf", f(f"add i64 {g0}, {a}"), accs[a], nt, tbl, ctrl)
                for a in range(unroll)]
    accs = counted_loop(f, f(f"udiv i64 %ng, {unroll}"), main, [(Z, "zeroinitializer")] * unroll, "main")
    done = f(f"mul i64 {f(f'udiv i64 %ng, {unroll}')}, {unroll}")

    def tail(f, i, acc):
        return [_fp4_group(f, "%w", "%x", "%buf", f(f"add i64 {done}, {i}"), acc[0], nt, tbl, ctrl)]
    (acc,) = counted_loop(f, f(f"sub i64 %ng, {done}"), tail, [(Z, vsum(f, accs))], "tail")
    f.put(f"ret float {f(f'call float @llvm.vector.reduce.fadd.v16f32(float 0.0, {Z} {acc})')}")
    return f.end()


# ------------------------------------------------------------------ fp8
def _fp8_chunk(f: Fn, wp, xp, acc, nt, tabs, mask=None):
    tl0, tl1, th0, th1 = tabs
    if mask is None:
        c = f(f"load <64 x i8>, ptr {wp}, align 1")
    else:
        c = f.masked_load("<64 x i8>", wp, mask)
    lo = f(f"call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {tl0}, <64 x i8> {c}, <64 x i8> {tl1})")
    hi = f(f"call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {th0}, <64 x i8> {c}, <64 x i8> {th1})")
    sign = f(f"and <64 x i8> {c}, {splat('i8', 64, -128)}")
    hi = f(f"or <64 x i8> {hi}, {sign}")
    out = list(acc)                                    # 2 * nt independent accumulators
    for half in range(2):
        idx = [lane * 16 + 8 * half + i + 64 * src for lane in range(4) for i in range(8) for src in (0, 1)]
        wv = f(f"shufflevector <64 x i8> {lo}, <64 x i8> {hi}, <64 x i32> {vec('i32', idx)}")
        wv = f(f"bitcast <64 x i8> {wv} to {BF}")
        for j in range(nt):
            xb = f(f"load {BF}, ptr {f.gep('i16', xp, 64 * j + 32 * half)}, align 2")
            k = 2 * j + half
            out[k] = f(f"call {Z} @llvm.x86.avx512bf16.dpbf16ps.512({Z} {out[k]}, {BF} {wv}, {BF} {xb})")
    return out


def _fp8_row(nt: int) -> str:
    tabs = _fp8_tables()
    f = Fn(f"define internal float @avx512_fp8_row{nt}(ptr %w, ptr %srow, ptr %x, i64 %K, i64 %b1) alwaysinline")
    ntiles = f("udiv i64 " + f("add i64 %K, " + f("sub i64 %b1, 1")) + ", %b1")

    cpt = f("lshr i64 " + f("add i64 %b1, 63") + ", 6")      # x' chunks per tile

    def tile(f, t, accs):
        k0 = f(f"mul i64 {t}, %b1")
        left = f(f"sub i64 %K, {k0}")
        ln = f(f"select i1 {f(f'icmp slt i64 {left}, %b1')}, i64 {left}, i64 %b1")
        c0 = f(f"mul i64 {t}, {cpt}")

        def at(f, c):
            wp = f.gep("i8", "%w", f(f"add i64 {k0}, {f(f'shl i64 {c}, 6')}"))
            return wp, f.gep("i16", "%x", f(f"mul i64 {f(f'add i64 {c0}, {c}')}, {64 * nt}"))

        def chunk(f, c, tmp):
            return _fp8_chunk(f, *at(f, c), tmp, nt, tabs)
        nfull = f(f"lshr i64 {ln}, 6")
        tmp = counted_loop(f, nfull, chunk, [(Z, "zeroinitializer")] * (2 * nt), "ch")
        rem = f(f"and i64 {ln}, 63")
        pre = f.block
        f.cbr(f(f"icmp ne i64 {rem}, 0"), "%rem", "%remx")
        f.label("rem")
        tmp2 = _fp8_chunk(f, *at(f, nfull), tmp, nt, tabs, mask_first(f, 64, rem))
        f.br("%remx")
        f.label("remx")
        tmp = vsum(f, [f.merge(Z, [(a, pre), (b, "%rem")]) for a, b in zip(tmp, tmp2)])
        sc = f.e8m0(f(f"load i8, ptr {f.gep('i8', '%srow', t)}"))
        return [f(f"call {Z} @llvm.fma.v16f32({Z} {tmp}, {Z} {f.splat('float', 16, sc)}, {Z} {accs[0]})")]
    (acc,) = counted_loop(f, ntiles, tile, [(Z, "zeroinitializer")], "tile")
    f.put(f"ret float {f(f'call float @llvm.vector.reduce.fadd.v16f32(float 0.0, {Z} {acc})')}")
    return f.end()


def prefetch_for(cpu: str) -> Prefetch:
    """The weight-stream prefetch for a host CPU (LLVM's CPU name, e.g. 'znver5')."""
    return PREFETCH_NTA if cpu in NTA_CPUS else PREFETCH_T1


def _fp8_row128(nt: int, pf: Prefetch) -> str:
    """b1 = 128 (the official tile): tile scales precomputed per row, 2 tiles per step, one
    software prefetch `pf` per 64-byte chunk (rows one at a time: on Zen 5 two rows sharing
    the x loads streamed 5-40% slower than one row with its prefetch)."""
    tabs = _fp8_tables()
    f = Fn(f"define internal float @avx512_fp8_r128_{nt}(ptr %w, ptr %srow, ptr %x, i64 %K, ptr %buf) alwaysinline")
    ntiles = f("lshr i64 " + f("add i64 %K, 127") + ", 7")
    _scales_to_buf(f, "%srow", ntiles, "%buf", "sc")

    def tile(f, t, acc, nfull=2, rem=None):
        tmp = [("zeroinitializer")] * (2 * nt)
        for c in range(nfull + (rem is not None)):
            wp = f.gep("i8", "%w", f(f"add i64 {f(f'shl i64 {t}, 7')}, {64 * c}"))
            ci = f(f"add i64 {f(f'shl i64 {t}, 1')}, {c}")           # x chunk: 2 per tile
            xp = f.gep("i16", "%x", f(f"mul i64 {ci}, {64 * nt}"))
            if rem is None:              # one prefetch next to each chunk (in bursts: 10% slower)
                pf.put(f, wp)
            tmp = _fp8_chunk(f, wp, xp, tmp, nt, tabs, rem if c == nfull else None)
        sc = f(f"load float, ptr {f.gep('float', '%buf', t)}, align 4")
        return f(f"call {Z} @llvm.fma.v16f32({Z} {vsum(f, tmp)}, {Z} {f.splat('float', 16, sc)}, {Z} {acc})")
    full = f("lshr i64 %K, 7")

    def two(f, i, accs):
        t0 = f(f"shl i64 {i}, 1")
        return [tile(f, t0, accs[0]), tile(f, f(f"add i64 {t0}, 1"), accs[1])]
    pair = counted_loop(f, f(f"lshr i64 {full}, 1"), two, [(Z, "zeroinitializer")] * 2, "two")
    acc = f(f"fadd {Z} {pair[0]}, {pair[1]}")
    pre = f.block
    f.cbr(f(f"icmp ne i64 {f(f'and i64 {full}, 1')}, 0"), "%odd", "%oddx")
    f.label("odd")
    odd = tile(f, f(f"sub i64 {full}, 1"), acc)
    f.br("%oddx")
    f.label("oddx")
    acc = f.merge(Z, [(acc, pre), (odd, "%odd")])
    rem = f("and i64 %K, 127")                                     # partial last tile
    pre = f.block
    f.cbr(f(f"icmp ne i64 {rem}, 0"), "%part", "%partx")
    f.label("part")
    f.cbr(f(f"icmp ugt i64 {rem}, 64"), "%p2", "%p1")
    f.label("p1")
    one = tile(f, full, acc, 0, mask_first(f, 64, rem))
    f.br("%partx")
    f.label("p2")
    two_ = tile(f, full, acc, 1, mask_first(f, 64, f(f"sub i64 {rem}, 64")))
    f.br("%partx")
    f.label("partx")
    acc = f.merge(Z, [(acc, pre), (one, "%p1"), (two_, "%p2")])
    f.put(f"ret float {f(f'call float @llvm.vector.reduce.fadd.v16f32(float 0.0, {Z} {acc})')}")
    return f.end()


# ------------------------------------------------------------------ bf16
def _bf16_step(f: Fn, c, accs, nt, mask=None):
    """32 weights (chunk c) times the nt bf16 planes of x' chunk c, into accs[0..nt)."""
    wp = f.gep("i16", "%w", f(f"shl i64 {c}, 5"))
    if mask is None:
        wv = f(f"load {BF}, ptr {wp}, align 2")
    else:
        wv = f(f"bitcast <64 x i8> {f.masked_load('<64 x i8>', wp, mask)} to {BF}")
    xp = f.gep("i16", "%x", f(f"mul i64 {c}, {32 * nt}"))
    out = []
    for j in range(nt):
        xb = f(f"load {BF}, ptr {f.gep('i16', xp, 32 * j)}, align 2")
        out.append(f(f"call {Z} @llvm.x86.avx512bf16.dpbf16ps.512({Z} {accs[j]}, {BF} {wv}, {BF} {xb})"))
    return out


def _bf16_row(nt: int, pf: Prefetch, unroll: int = 4) -> str:
    """bf16 weights need no decode: 32 words per vdpbf16ps against x' in natural order."""
    f = Fn(f"define internal float @avx512_bf16_row{nt}(ptr %w, ptr %x, i64 %K) alwaysinline")
    nfull = f("lshr i64 %K, 5")

    def main(f, u, accs):
        c0 = f(f"mul i64 {u}, {unroll}")
        at = f.gep("i8", "%w", f(f"shl i64 {c0}, 6"))
        out = []
        for a in range(unroll):        # one line per step, each next to its step; file-cache pages need it
            pf.put(f, at, 64 * a)
            out += _bf16_step(f, f(f"add i64 {c0}, {a}"), accs[a * nt:(a + 1) * nt], nt)
        return out
    accs = counted_loop(f, f(f"udiv i64 {nfull}, {unroll}"), main, [(Z, "zeroinitializer")] * (unroll * nt), "main")
    done = f(f"mul i64 {f(f'udiv i64 {nfull}, {unroll}')}, {unroll}")
    accs = counted_loop(f, f(f"sub i64 {nfull}, {done}"),
                        lambda f, i, a: _bf16_step(f, f(f"add i64 {done}, {i}"), a, nt),
                        [(Z, a) for a in accs[:nt]], "rest") + accs[nt:]
    acc = vsum(f, accs)
    rem = f("and i64 %K, 31")                              # partial last chunk
    pre = f.block
    f.cbr(f(f"icmp ne i64 {rem}, 0"), "%part", "%partx")
    f.label("part")
    acc2 = vsum(f, _bf16_step(f, nfull, [acc] + ["zeroinitializer"] * (nt - 1), nt,
                              mask_first(f, 64, f(f"shl i64 {rem}, 1"))))
    f.br("%partx")
    f.label("partx")
    acc = f.merge(Z, [(acc, pre), (acc2, "%part")])
    f.put(f"ret float {f(f'call float @llvm.vector.reduce.fadd.v16f32(float 0.0, {Z} {acc})')}")
    return f.end()


# ------------------------------------------------------------------ exported row-block kernels
def _export(fmt: str, call_row, prologue=None) -> str:
    """dsv4_avx512_{fmt}: y[r] = call_row(f, r, ctx) for the block's rows; ctx = what
    prologue(f) makes once per call (None without one)."""
    f = Fn(f"define void @dsv4_avx512_{fmt}(ptr %w, ptr %s, ptr %x, ptr %y, i64 %nrows, i64 %K, "
           "i64 %nterms, i64 %row0, i64 %b0, i64 %b1, i64 %scols)")
    ctx = prologue(f) if prologue else None

    def row(f, r, _):
        f.put(f"store float {call_row(f, r, ctx)}, ptr {f.gep('float', '%y', r)}, align 4")
        return []
    counted_loop(f, "%nrows", row, [], "rows")
    f.put("ret void")
    return f.end()


def _fp8_export() -> str:
    """dsv4_avx512_fp8: rows one by one, through avx512_fp8_r128_* for 128-wide tiles
    (the official layout) and avx512_fp8_row* otherwise."""
    f = Fn("define void @dsv4_avx512_fp8(ptr %w, ptr %s, ptr %x, ptr %y, i64 %nrows, i64 %K, "
           "i64 %nterms, i64 %row0, i64 %b0, i64 %b1, i64 %scols)")
    n = f("and i64 " + f("add i64 " + f("lshr i64 " + f("add i64 %K, 127") + ", 7") + ", 15") + ", -16")
    buf = f(f"alloca float, i64 {n}, align 64")

    def row(f, r, _):
        band = f(f"udiv i64 {f(f'add i64 %row0, {r}')}, %b0")
        s = f.gep("i8", "%s", f(f"mul i64 {band}, %scols"))
        w = f.gep("i8", "%w", f(f"mul i64 {r}, %K"))
        v = choose(f, f("icmp eq i64 %b1, 128"),
                   lambda f: by_nterms(f, "avx512_fp8_r128_", f"ptr {w}, ptr {s}, ptr %x, i64 %K, ptr {buf}"),
                   lambda f: by_nterms(f, "avx512_fp8_row", f"ptr {w}, ptr {s}, ptr %x, i64 %K, i64 %b1"))
        f.put(f"store float {v}, ptr {f.gep('float', '%y', r)}, align 4")
        return []
    counted_loop(f, "%nrows", row, [], "rows")
    f.put("ret void")
    return f.end()


def module(amx: bool = False, pf: Prefetch = PREFETCH_T1) -> str:
    """The avx512 module text; `amx`: include the AMX tile kernel (else a trap stub); `pf`:
    the weight streams' software prefetch (prefetch_for(host CPU))."""
    def bf16(f, r, _):                    # nterms 0: x in the avx2 float layout
        w = f.gep("i8", "%w", f(f"mul i64 {f(f'mul i64 {r}, %K')}, 2"))
        return choose(f, f("icmp eq i64 %nterms, 0"),
                      lambda f: f(f"call float @avx2_bf16_row(ptr {w}, ptr %x, i64 %K)"),
                      lambda f: by_nterms(f, "avx512_bf16_row", f"ptr {w}, ptr %x, i64 %K"))

    parts = [DECLS] + ir_avx512_int.functions(pf)
    parts += [_fp4_row(nt) for nt in NTERMS] + [_fp8_row(nt) for nt in NTERMS] + [_fp8_row128(nt, pf) for nt in NTERMS]
    parts += [_bf16_row(nt, pf) for nt in NTERMS] + ir_gemm.functions(_fp8_tables()) + ir_amx.functions(amx)
    parts += ir_attn.functions("avx512")
    parts += [ir_avx512_int.fp4_export(pf), _fp8_export(), _export("bf16", bf16)]
    parts += ir_avx2.float_kernels("avx512", ("f32",), pf) + [ir_avx2.float_row("bf16", pf)]
    return "\n\n".join(parts)
