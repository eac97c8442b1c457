"""AVX-512 BF16 GEMM pieces for prefill (linked into the avx512 IR module; driver: gemm.py).

For activations that are exact in bf16 (e4m3-quantized rows are) and MXFP4 or FP8 weights,
every operand of out = x W^T is a bf16 number, so `vdpbf16ps` (32 products per instruction, float32
accumulation, twice the float32 FMA rate) computes the same sums as a float32 GEMM of the
dequantized weights, to accumulation order:

- `dsv4_avx512_fp4_bf16(w, s, out, nrows, K)`: nrows MXFP4 rows -> bf16 rows in natural
  order, 4 groups (one 64-byte load, 4 scale bytes) per step. vpmultishiftqb puts each
  nibble in both bytes of its word, vpermb maps it to the two bytes of bf16(e2m1), and the
  group's e8m0 scale is added to the exponent field of the nonzero words (exact when every
  scale byte is in 2..252: the caller checks).
- `dsv4_avx512_fp8_bf16(w, s, out, nrows, K, row0, b0, b1, scols)`: rows row0 .. of an
  FP8 matrix with (b0, b1) tile scales -> bf16 rows: two vpermi2b tables give the low and
  high bytes of bf16(e4m3), the sign is OR-ed in, bytes are interleaved to words and the
  tile's scale (one per tile loop, no division per chunk) is added to the exponents of the
  nonzero, non-NaN words (K and b1 multiples of 64: the caller checks).
- `dsv4_avx512_pack_bf16(x, ldx, M, K, xp, mpad, bad)`: x float32 rows (ldx floats apart,
  K a multiple of 32) -> xp[k/2, m] bf16 pairs, 16 rows x 16 pairs at a time: one word
  shuffle per row keeps the high halves, a 4-stage interleave transposes the 16 x 16
  dwords; rows >= M are zero; *bad (i64) gets nonzero bits if a value is not exact in bf16
  (low half set, or nonzero with a zero exponent field).
- `dsv4_avx512_bf16_tile(wb, K, nr, xp, mpad, c, ldc, nj)`: a C^T tile of 8 weight rows x
  16*nj token lanes: c[r * ldc + m] = sum_k wb[r, k] x[m, k] with x packed as bf16 pairs
  xp[k/2, m] (uint32, mpad lanes per pair), rows r < nr (the buffer holds 8 rows; rows
  beyond nr are computed on stale data and not stored). The 8 x nj accumulators stay in
  registers for the whole K; per k-pair: nj loads of x, 8 broadcasts of a weight pair,
  8*nj vdpbf16ps (for nj = 1 two accumulator sets take alternate pairs, so the loop does
  not wait on the instruction's latency). (Scattering straight into a row-major output was 8% slower: the
  driver transposes each unit's small C^T block instead.)
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.formats import E2M1_VALUES

from .irgen import Fn, bf16_bits, counted_loop, i8s, splat, vec

Z = "<16 x float>"
BF = "<32 x bfloat>"
W16 = "<32 x i16>"
MR = 8                 # weight rows per tile
LANES = 16             # token lanes per accumulator
MAX_NJ = 3             # accumulators per row: up to 48 token lanes per tile
# e8m0 bytes for which adding the scale to the exponent keeps every nonzero weight a
# normal bf16: e2m1 magnitudes 2^-1 .. 6, e4m3 magnitudes 2^-9 .. 448
SCALE_RANGE = {"fp4": (2, 252), "fp8": (10, 246)}
PARAMS = {"dsv4_avx512_fp4_bf16": "pppii", "dsv4_avx512_fp8_bf16": "pppiiiiii",
          "dsv4_avx512_bf16_tile": "piipipii", "dsv4_avx512_pack_bf16": "piiipip"}


def _fp4_tables():
    """vpermb table (index n -> high byte of bf16(e2m1 n), n | 16 -> low byte), the
    multishift control that puts, for word i of a 32-group, nibble i & 1 of byte i >> 1
    in both its bytes (each qword of the shuffled input holds source bytes 2q and 2q + 1),
    the low-byte index bit pattern, and the byte spread (a list: output byte -> group byte)."""
    bits = bf16_bits(E2M1_VALUES)
    tbl = np.zeros(64, np.int64)
    tbl[:16] = bits >> 8
    tbl[16:32] = bits & 0xFF
    ctrl = []
    for _q in range(8):
        for word in range(4):
            ctrl += [8 * (word >> 1) + 4 * (word & 1)] * 2
    ix_or = [16, 0] * 32                                  # low byte first (little-endian)
    spread = [2 * (t // 8) + (t % 2) for t in range(64)]  # qword q <- bytes 2q, 2q + 1
    return vec("i8", i8s(tbl)), vec("i8", ctrl), vec("i8", ix_or), spread


def fp4_bf16_export() -> str:
    tbl, ctrl, ix_or, spread = _fp4_tables()
    f = Fn("define void @dsv4_avx512_fp4_bf16(ptr %w, ptr %s, ptr %out, i64 %nrows, i64 %K)")
    ng = f("lshr i64 %K, 5")

    def decode(f, src, i, d):
        """Group i of the 64 bytes in src -> 32 bf16 words times 2^(s-127) (d: the
        exponent step, splat)."""
        idx = vec("i32", [16 * i + v for v in spread])
        p = f(f"shufflevector <64 x i8> {src}, <64 x i8> poison, <64 x i32> {idx}")
        t = f(f"call <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8> {ctrl}, <64 x i8> {p})")
        t = f(f"and <64 x i8> {t}, {splat('i8', 64, 15)}")
        t = f(f"or <64 x i8> {t}, {ix_or}")
        wv = f(f"call <64 x i8> @llvm.x86.avx512.permvar.qi.512(<64 x i8> {tbl}, <64 x i8> {t})")
        return _add_scale(f, f(f"bitcast <64 x i8> {wv} to {W16}"), d, finite=True)

    def row(f, r, _):
        wr = f.gep("i8", "%w", f(f"mul i64 {r}, {f('lshr i64 %K, 1')}"))
        sr = f.gep("i8", "%s", f(f"mul i64 {r}, {ng}"))
        orow = f.gep("i16", "%out", f(f"mul i64 {r}, %K"))

        def quad(f, q, _):                            # 4 groups: one 64-byte load
            g0 = f(f"shl i64 {q}, 2")
            src = f(f"load <64 x i8>, ptr {f.gep('i8', wr, f(f'shl i64 {g0}, 4'))}, align 1")
            d4 = _exponent_steps(f, f.gep("i8", sr, g0), 4)
            for i in range(4):
                d = f(f"shufflevector <4 x i16> {d4}, <4 x i16> poison, <32 x i32> {splat('i32', 32, i)}")
                wv = decode(f, src, i, d)
                at = f(f"shl i64 {f(f'add i64 {g0}, {i}')}, 5")
                f.put(f"store {W16} {wv}, ptr {f.gep('i16', orow, at)}, align 2")
            return []
        nq = f(f"lshr i64 {ng}, 2")
        counted_loop(f, nq, quad, [], "q")

        def group(f, j, _):                           # the last 0-3 groups
            g = f(f"add i64 {f(f'shl i64 {nq}, 2')}, {j}")
            h = f(f"load <16 x i8>, ptr {f.gep('i8', wr, f(f'shl i64 {g}, 4'))}, align 1")
            src = f(f"shufflevector <16 x i8> {h}, <16 x i8> poison, <64 x i32> {vec('i32', list(range(16)) * 4)}")
            d = _splat1(f, _exponent_steps(f, f.gep("i8", sr, g), 1))
            f.put(f"store {W16} {decode(f, src, 0, d)}, ptr {f.gep('i16', orow, f(f'shl i64 {g}, 5'))}, align 2")
            return []
        counted_loop(f, f(f"and i64 {ng}, 3"), group, [], "g")
        return []
    counted_loop(f, "%nrows", row, [], "r")
    f.put("ret void")
    return f.end()


def _exponent_steps(f: Fn, sb: str, n: int) -> str:
    """n e8m0 bytes at sb -> <n x i16> exponent steps (s - 127) << 7."""
    b = f(f"zext <{n} x i8> {f(f'load <{n} x i8>, ptr {sb}, align 1')} to <{n} x i16>")
    e = f(f"sub <{n} x i16> {b}, {splat('i16', n, 127)}")
    return f(f"shl <{n} x i16> {e}, {splat('i16', n, 7)}")


def _splat1(f: Fn, d1: str) -> str:
    """<1 x i16> -> the same step in all 32 words."""
    return f(f"shufflevector <1 x i16> {d1}, <1 x i16> poison, <32 x i32> zeroinitializer")


def _add_scale(f: Fn, wv: str, d: str, finite: bool) -> str:
    """wv (32 bf16 words) times 2^(s - 127), d = splat((s - 127) << 7): d added to the
    exponent field of every nonzero word (and only finite ones unless `finite`, i.e. the
    format has no Inf/NaN codes); the caller guarantees the results stay normal."""
    mag = f(f"and {W16} {wv}, {splat('i16', 32, 0x7FFF)}")
    ok = f(f"icmp ne {W16} {mag}, zeroinitializer")
    if not finite:
        fin = f(f"icmp ult {W16} {mag}, {splat('i16', 32, 0x7F80)}")
        ok = f(f"and <32 x i1> {ok}, {fin}")
    return f(f"select <32 x i1> {ok}, {W16} {f(f'add {W16} {wv}, {d}')}, {W16} {wv}")


def fp8_bf16_export(tabs) -> str:
    """tabs: ir_avx512's four 64-entry byte tables (low bytes of codes 0-63, 64-127, then
    the high bytes) of bf16(e4m3 magnitude), NaN for 0x7F."""
    tl0, tl1, th0, th1 = tabs
    f = Fn("define void @dsv4_avx512_fp8_bf16(ptr %w, ptr %s, ptr %out, i64 %nrows, i64 %K, i64 %row0, "
           "i64 %b0, i64 %b1, i64 %scols)")
    ntiles = f("udiv i64 " + f("add i64 %K, " + f("sub i64 %b1, 1")) + ", %b1")
    lo_idx = vec("i32", [i + 64 * h for i in range(32) for h in (0, 1)])
    hi_idx = vec("i32", [32 + i + 64 * h for i in range(32) for h in (0, 1)])

    def row(f, r, _):
        band = f(f"udiv i64 {f(f'add i64 %row0, {r}')}, %b0")
        sr = f.gep("i8", "%s", f(f"mul i64 {band}, %scols"))
        wr = f.gep("i8", "%w", f(f"mul i64 {r}, %K"))
        orow = f.gep("i16", "%out", f(f"mul i64 {r}, %K"))

        def tile(f, t, _):                            # one scale per tile: no division per chunk
            t0 = f(f"mul i64 {t}, %b1")
            left = f(f"sub i64 %K, {t0}")
            short = f(f"icmp slt i64 {left}, %b1")
            n = f(f"lshr i64 {f(f'select i1 {short}, i64 {left}, i64 %b1')}, 6")
            d = _splat1(f, _exponent_steps(f, f.gep("i8", sr, t), 1))

            def chunk(f, c, _):
                k0 = f(f"add i64 {t0}, {f(f'shl i64 {c}, 6')}")
                code = f(f"load <64 x i8>, ptr {f.gep('i8', wr, k0)}, align 1")
                lo = f(f"call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {tl0}, <64 x i8> {code}, <64 x i8> {tl1})")
                hi = f(f"call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {th0}, <64 x i8> {code}, <64 x i8> {th1})")
                sign = f(f"and <64 x i8> {code}, {splat('i8', 64, -128)}")
                hi = f(f"or <64 x i8> {hi}, {sign}")
                for half, idx in enumerate((lo_idx, hi_idx)):
                    wv = f(f"shufflevector <64 x i8> {lo}, <64 x i8> {hi}, <64 x i32> {idx}")
                    wv = _add_scale(f, f(f"bitcast <64 x i8> {wv} to {W16}"), d, finite=False)
                    f.put(f"store {W16} {wv}, ptr {f.gep('i16', orow, f(f'add i64 {k0}, {32 * half}'))}, align 2")
                return []
            counted_loop(f, n, chunk, [], "c")
            return []
        counted_loop(f, ntiles, tile, [], "t")
        return []
    counted_loop(f, "%nrows", row, [], "r")
    f.put("ret void")
    return f.end()


def _tile(nj: int) -> str:
    f = Fn(f"define internal void @avx512_bf16_tile{nj}(ptr %wb, i64 %K, i64 %nr, ptr %xp, i64 %mpad, "
           "ptr %c, i64 %ldc) alwaysinline")
    # rows r >= nr hold whatever the buffer held (finite or not); they are computed (a
    # uniform stride keeps the row addresses in few registers) but never stored
    rows = [f.gep("i16", "%wb", f(f"mul i64 {r}, %K")) for r in range(MR)]
    # one token block (nj = 1) gives each accumulator one vdpbf16ps per pair, so the loop
    # would wait on its latency: then two pairs per step into two accumulator sets (K is a
    # multiple of 4 for both formats), summed at the end
    sets = 2 if nj == 1 else 1
    nsteps = f(f"lshr i64 %K, {sets}")

    def step(f, i, accs):
        out = list(accs)
        for h in range(sets):
            p = f(f"add i64 {f(f'mul i64 {i}, {sets}')}, {h}")
            xrow = f.gep("i32", "%xp", f(f"mul i64 {p}, %mpad"))
            xv = [f(f"load {BF}, ptr {f.gep('i32', xrow, LANES * j)}, align 4") for j in range(nj)]
            for r in range(MR):
                wq = f(f"load i32, ptr {f.gep('i32', rows[r], p)}, align 4")
                b = f(f"bitcast <16 x i32> {f.splat('i32', 16, wq)} to {BF}")
                for j in range(nj):
                    a = (h * MR + r) * nj + j
                    out[a] = f(f"call {Z} @llvm.x86.avx512bf16.dpbf16ps.512({Z} {out[a]}, {BF} {b}, {BF} {xv[j]})")
        return out
    accs = counted_loop(f, nsteps, step, [(Z, "zeroinitializer")] * (sets * MR * nj), "k")
    if sets == 2:
        accs = [f(f"fadd {Z} {accs[a]}, {accs[MR * nj + a]}") for a in range(MR * nj)]
    for r in range(MR):
        f.cbr(f(f"icmp slt i64 {r}, %nr"), f"%st{r}", "%done")
        f.label(f"st{r}")
        crow = f.gep("float", "%c", f(f"mul i64 {r}, %ldc"))
        for j in range(nj):
            f.put(f"store {Z} {accs[r * nj + j]}, ptr {f.gep('float', crow, LANES * j)}, align 4")
    f.br("%done")
    f.label("done")
    f.put("ret void")
    return f.end()


def tile_export() -> str:
    f = Fn("define void @dsv4_avx512_bf16_tile(ptr %wb, i64 %K, i64 %nr, ptr %xp, i64 %mpad, "
           "ptr %c, i64 %ldc, i64 %nj)")
    cases = " ".join(f"i64 {nj}, label %nj{nj}" for nj in range(1, MAX_NJ))
    f.put(f"switch i64 %nj, label %nj{MAX_NJ} [ {cases} ]")
    for nj in range(1, MAX_NJ + 1):
        f.label(f"nj{nj}")
        f.put(f"call void @avx512_bf16_tile{nj}(ptr %wb, i64 %K, i64 %nr, ptr %xp, i64 %mpad, ptr %c, "
              "i64 %ldc)")
        f.put("ret void")
    return f.end()


def pack_export() -> str:
    V = "<16 x i32>"
    f = Fn("define void @dsv4_avx512_pack_bf16(ptr %x, i64 %ldx, i64 %M, i64 %K, ptr %xp, i64 %mpad, ptr %bad)")
    odd = vec("i32", range(1, 64, 2))

    def inter(a, b, half):
        idx = [v for i in range(8) for v in (8 * half + i, 16 + 8 * half + i)]
        return f(f"shufflevector {V} {a}, {V} {b}, <16 x i32> {vec('i32', idx)}")

    def rowblock(f, rb, acc):
        m0 = f(f"shl i64 {rb}, 4")

        def pairblock(f, qb, acc):
            k0 = f(f"shl i64 {qb}, 5")
            rows, bad = [], acc[0]
            for i in range(16):
                m = f(f"add i64 {m0}, {i}")
                ok = f(f"icmp slt i64 {m}, %M")
                mr = f(f"select i1 {ok}, i64 {m}, i64 0")
                ptr = f.gep("float", "%x", f(f"add i64 {f(f'mul i64 {mr}, %ldx')}, {k0}"))
                mask = f.splat("i1", 32, ok)
                w = f(f"call <32 x i32> @llvm.masked.load.v32i32.p0(ptr {ptr}, i32 4, <32 x i1> {mask}, "
                      "<32 x i32> zeroinitializer)")
                lowbits = f(f"and <32 x i32> {w}, {splat('i32', 32, 0xFFFF)}")
                ex = f(f"and <32 x i32> {w}, {splat('i32', 32, 0x7F800000)}")
                mg = f(f"and <32 x i32> {w}, {splat('i32', 32, 0x7FFFFFFF)}")
                zexp = f(f"icmp eq <32 x i32> {ex}, zeroinitializer")
                nz = f(f"icmp ne <32 x i32> {mg}, zeroinitializer")
                sub = f(f"zext <32 x i1> {f(f'and <32 x i1> {zexp}, {nz}')} to <32 x i32>")
                bad = f(f"or <32 x i32> {bad}, {f(f'or <32 x i32> {lowbits}, {sub}')}")
                w16 = f(f"bitcast <32 x i32> {w} to <64 x i16>")
                hw = f(f"shufflevector <64 x i16> {w16}, <64 x i16> poison, <32 x i32> {odd}")
                rows.append(f(f"bitcast <32 x i16> {hw} to {V}"))
            for _ in range(4):                        # interleave stages: a 16 x 16 transpose
                rows = [inter(rows[i], rows[i + 8], h) for i in range(8) for h in (0, 1)]
            for q in range(16):
                pq = f(f"add i64 {f(f'lshr i64 {k0}, 1')}, {q}")
                at = f(f"add i64 {f(f'mul i64 {pq}, %mpad')}, {m0}")
                f.put(f"store {V} {rows[q]}, ptr {f.gep('i32', '%xp', at)}, align 4")
            return [bad]
        return counted_loop(f, f("lshr i64 %K, 5"), pairblock, [("<32 x i32>", acc[0])], "q")
    (bad,) = counted_loop(f, f("lshr i64 %mpad, 4"), rowblock, [("<32 x i32>", "zeroinitializer")], "rb")
    total = f(f"call i32 @llvm.vector.reduce.or.v32i32(<32 x i32> {bad})")
    f.put(f"store i64 {f(f'zext i32 {total} to i64')}, ptr %bad, align 8")
    f.put("ret void")
    return f.end()


def functions(fp8_tables) -> list[str]:
    return [_tile(nj) for nj in range(1, MAX_NJ + 1)] + [fp4_bf16_export(), fp8_bf16_export(fp8_tables),
                                                         tile_export(), pack_export()]
