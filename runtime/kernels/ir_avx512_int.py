"""AVX-512 fp4 kernel for x in the integer layout (prep.fp4_int): VNNI int8 dot products.

When every 32-group of x is c * 2^E with integers |c| < 2^23 (always true for e4m3-quantized
activations), x is given as the signed base-256 digits of c (prep.fp4_int). vpermb maps
nibbles to the unsigned bytes 2*e2m1 + 12, and vpdpbusd forms sum(byte * int8 digit) per
digit plane; the first plane starts from the x layout's correction, -12 * sum(c) per lane,
which takes the offset back out (so no per-row sign work is needed). Planes are combined in
int32, converted once per 4 groups and multiplied by 2^(s-127) * 2^(E-1). Blocks whose c
have two digits (-32896 <= c <= 32639; most of them for real activations) are listed first
by the x layout and done with two planes instead of three; the kernel still takes the weight
blocks in order, as two-plane runs between consecutive three-plane blocks (no per-block
branch). Four rows are processed together so the x loads are shared (then a pair and a
single row for the rest), each row stream with its software prefetch: interleaved row
streams defeat the hardware prefetcher. The rows' scales are a stream of their own (1/16
of the weight bytes, read in bursts of a group's rows at the start of each group); each
group prefetches the scales of the group SCALE_AHEAD groups ahead (from memory, one
thread, on Zen 5: 2048x4096 ~81% -> ~89% of the probe). The per-lane scale
is built by adding s << 23 to the x factor's exponent when the row's e8m0 bytes and the x
exponents keep that in the normal range (checked per row); otherwise exactly with floats
(e8m0 0 -> 2^-127, 255 -> NaN, as the reference).
"""
from __future__ import annotations

from dsv4.quant.formats import E2M1_VALUES

from .irgen import Fn, Prefetch, by_nterms, counted_loop, fp4_int_in_order, mask_first, splat, vec

Z = "<16 x float>"
INT_DIGITS, INT_FACTORS = 64, 448     # byte offsets in a 512-byte x block (prep.fp4_int)
ROW_GROUPS = (4, 2, 1)                # rows per pass: groups of 4 first, then the rest
SCALE_AHEAD = 2                       # scale rows prefetched this many groups of 4 ahead


def _fp4_int_blocks(f: Fn, ws, xb, svs, accs, planes: int, mask=None):
    """One block of 4 groups for len(ws) rows sharing the x loads:
    acc_r += cvt(correction + sum_d 256^d sum((2*e2m1 + 12) * digit_d of c)) * sv_r."""
    tbl = vec("i8", [int(2 * v) + 12 for v in E2M1_VALUES] * 4)   # vpermb reads 6 index bits: 4 copies
    corr = f(f"load <16 x i32>, ptr {xb}, align 4")
    digits = [[f(f"load <16 x i32>, ptr {f.gep('i8', xb, INT_DIGITS + 128 * d + 64 * h)}, align 4") for h in range(2)]
              for d in range(planes)]
    out = []
    for w, sv, acc in zip(ws, svs, accs):
        if mask is None:
            p = f(f"load <64 x i8>, ptr {w}, align 1")
        else:
            p = f.masked_load("<64 x i8>", w, mask)
        hw = f(f"lshr <32 x i16> {f(f'bitcast <64 x i8> {p} to <32 x i16>')}, {splat('i16', 32, 4)}")
        hi = f(f"bitcast <32 x i16> {hw} to <64 x i8>")                # high nibbles in bits 0-3
        # vpermb looks at index bits 0-5 only and the table repeats every 16 entries, so
        # the other nibble's bits 4-5 need no masking
        wv = [f(f"call <64 x i8> @llvm.x86.avx512.permvar.qi.512(<64 x i8> {tbl}, <64 x i8> {n})") for n in (p, hi)]
        wv = [f(f"bitcast <64 x i8> {v} to <16 x i32>") for v in wv]
        t = None                         # planes summed independently (short dependency chains)
        for d in range(planes):
            a = corr if d == 0 else "zeroinitializer"
            for h in range(2):           # unsigned weight bytes times signed digits
                a = f(f"call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> {a}, <16 x i32> {wv[h]}, "
                      f"<16 x i32> {digits[d][h]})")
            if d:
                a = f(f"shl <16 x i32> {a}, {splat('i32', 16, 8 * d)}")
            t = a if t is None else f(f"add <16 x i32> {t}, {a}")
        out.append(f(f"call {Z} @llvm.fma.v16f32({Z} {f(f'sitofp <16 x i32> {t} to {Z}')}, {Z} {sv}, {Z} {acc})"))
    return out


def _scales(f: Fn, fast: bool, sps, xb, mask):
    """Per row: 16 floats 2^(s[g]-127) * x factor[g] (4 lanes per group) of one block."""
    # multishift: dword i <- bits of s[i // 4] placed at 23..30 (after the AND): byte 2 takes
    # the field at bit 8q - 7 (s bit 0 -> bit 7), byte 3 the field at bit 8q + 1
    ctrl = vec("i8", [[0, 0, (8 * (i // 4) - 7) % 64, 8 * (i // 4) + 1][j] for i in range(16) for j in range(4)])
    xf = f(f"load <16 x i32>, ptr {f.gep('i8', xb, INT_FACTORS)}, align 4")
    fadj = f(f"sub <16 x i32> {xf}, {splat('i32', 16, 0x3F800000)}")   # exponent add = multiply
    out = []
    for sp in sps:
        if mask is None:
            d = f(f"load i32, ptr {sp}, align 1")
        else:                                                          # 1-3 scale bytes
            m4 = mask_first(f, 4, f("and i64 %ng, 3"))
            d = f.masked_load("<4 x i8>", sp, m4, splat("i8", 4, 127))
            d = f(f"bitcast <4 x i8> {d} to i32")
        if fast:
            v = f(f"bitcast <16 x i32> {f.splat('i32', 16, d)} to <64 x i8>")
            v = f(f"call <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8> {ctrl}, <64 x i8> {v})")
            v = f(f"and <16 x i32> {f(f'bitcast <64 x i8> {v} to <16 x i32>')}, {splat('i32', 16, 0x7F800000)}")
            out.append(f(f"bitcast <16 x i32> {f(f'add <16 x i32> {v}, {fadj}')} to {Z}"))
        else:
            e = f.e8m0(f(f"bitcast i32 {d} to <4 x i8>"), 4)
            spread = vec("i32", [i // 4 for i in range(16)])
            e = f(f"shufflevector <4 x float> {e}, <4 x float> poison, <16 x i32> {spread}")
            out.append(f(f"fmul {Z} {e}, {f(f'bitcast <16 x i32> {xf} to {Z}')}"))
    return out


def _blocks_start(f: Fn, ng: str) -> str:
    """Byte offset of the first x block (after the header of prep.int_header words)."""
    nb = f(f"lshr i64 {f(f'add i64 {ng}, 3')}, 2")
    words = f(f"and i64 {f(f'add i64 {nb}, 17')}, -16")               # (2 + nb) rounded up to 16
    return f(f"shl i64 {words}, 2")


def _fp4_int_rows(nr: int, fast: bool, pf: Prefetch) -> str:
    """nr (a ROW_GROUPS size) rows at once, x in the prep.fp4_int layout (header + sorted
    blocks); each row stream prefetched with `pf` when nr > 1."""
    args = ", ".join(f"ptr %w{r}, ptr %s{r}, ptr %y{r}" for r in range(nr))
    f = Fn(f"define internal void @avx512_fp4_int{nr}{'f' if fast else ''}({args}, ptr %x, i64 %ng) alwaysinline")
    xblk = f.gep("i8", "%x", _blocks_start(f, "%ng"))
    nfull = f("lshr i64 %ng, 2")

    def block(f, p, o, accs, planes, mask=None):
        """Stored block p (x) = original block o (weights, scales)."""
        ws = [f.gep("i8", f"%w{r}", f(f"shl i64 {o}, 6")) for r in range(nr)]
        if mask is None and nr > 1:        # interleaved row streams defeat the HW prefetcher
            for w in ws:
                pf.put(f, w)
        xb = f.gep("i8", xblk, f(f"shl i64 {p}, 9"))
        sps = [f.gep("i8", f"%s{r}", f(f"shl i64 {o}, 2")) for r in range(nr)]
        return _fp4_int_blocks(f, ws, xb, _scales(f, fast, sps, xb, mask), accs, planes, mask)

    accs = fp4_int_in_order(f, "%x", nfull, block, [(Z, "zeroinitializer")] * nr)
    rem = f("and i64 %ng, 3")
    pre = f.block
    f.cbr(f(f"icmp ne i64 {rem}, 0"), "%part", "%partx")
    f.label("part")                                               # last 1-3 groups: masked loads
    accs2 = block(f, nfull, nfull, accs, 3, mask_first(f, 64, f(f"shl i64 {rem}, 4")))
    f.br("%partx")
    f.label("partx")
    accs = [f.merge(Z, [(a, pre), (b, "%part")]) for a, b in zip(accs, accs2)]
    for r in range(nr):
        total = f(f"call float @llvm.vector.reduce.fadd.v16f32(float 0.0, {Z} {accs[r]})")
        f.put(f"store float {total}, ptr %y{r}, align 4")
    f.put("ret void")
    return f.end()


def _scale_range() -> str:
    """i1 @avx512_e8m0_in(ptr s, i64 n, i8 lo, i8 span): every byte b has 0 <= b - lo <= span.
    The largest b - lo (unsigned, wrapping) over full 64-byte chunks, then the masked tail."""
    f = Fn("define internal i1 @avx512_e8m0_in(ptr %s, i64 %n, i8 %lo, i8 %span) alwaysinline")
    V = "<64 x i8>"
    lo = f.splat("i8", 64, "%lo")

    def step(f, c, acc):
        b = f(f"load {V}, ptr {f.gep('i8', '%s', f(f'shl i64 {c}, 6'))}, align 1")
        return [f(f"call {V} @llvm.umax.v64i8({V} {acc[0]}, {V} {f(f'sub {V} {b}, {lo}')})")]
    (acc,) = counted_loop(f, f("lshr i64 %n, 6"), step, [(V, "zeroinitializer")], "e")
    off = f("and i64 %n, -64")
    tail = f.masked_load(V, f.gep("i8", "%s", off), mask_first(f, 64, f("and i64 %n, 63")), lo)
    acc = f(f"call {V} @llvm.umax.v64i8({V} {acc}, {V} {f(f'sub {V} {tail}, {lo}')})")
    top = f(f"call i8 @llvm.vector.reduce.umax.v64i8({V} {acc})")
    f.put(f"ret i1 {f('icmp ule i8 ' + top + ', %span')}")
    return f.end()


def _factor_exponents(f: Fn, ng: str) -> tuple[str, str, str]:
    """(lo, span, ok) for @avx512_e8m0_in: the fast scale path needs 1 <= s <= 254 and
    1 <= s - 127 + FE <= 254 for every exponent field FE of the x factors (ok: FE >= 1)."""
    nb = f(f"lshr i64 {f(f'add i64 {ng}, 3')}, 2")
    V = "<16 x i32>"

    start = _blocks_start(f, ng)

    def step(f, b, acc):
        blk = f(f"add i64 {start}, {f(f'shl i64 {b}, 9')}")
        off = f(f"add i64 {blk}, {INT_FACTORS}")
        v = f(f"load {V}, ptr {f.gep('i8', '%x', off)}, align 4")
        sh = f(f"lshr {V} {v}, {splat('i32', 16, 23)}")
        e = f(f"and {V} {sh}, {splat('i32', 16, 255)}")
        lo = f(f"select <16 x i1> {f(f'icmp ult {V} {e}, {acc[0]}')}, {V} {e}, {V} {acc[0]}")
        hi = f(f"select <16 x i1> {f(f'icmp ugt {V} {e}, {acc[1]}')}, {V} {e}, {V} {acc[1]}")
        return [lo, hi]
    emin, emax = counted_loop(f, nb, step, [(V, splat("i32", 16, 255)), (V, "zeroinitializer")], "fe")
    emin = f(f"call i32 @llvm.vector.reduce.umin.v16i32({V} {emin})")
    emax = f(f"call i32 @llvm.vector.reduce.umax.v16i32({V} {emax})")
    lo = f(f"sub i32 128, {emin}")
    lo = f(f"select i1 {f(f'icmp slt i32 {lo}, 1')}, i32 1, i32 {lo}")
    hi = f(f"sub i32 381, {emax}")
    hi = f(f"select i1 {f(f'icmp sgt i32 {hi}, 254')}, i32 254, i32 {hi}")
    span = f(f"sub i32 {hi}, {lo}")
    ok = f(f"and i1 {f(f'icmp sge i32 {span}, 0')}, {f(f'icmp ne i32 {emin}, 0')}")
    return f(f"trunc i32 {lo} to i8"), f(f"trunc i32 {span} to i8"), ok


def fp4_export(pf: Prefetch) -> str:
    """fp4 rows: nterms 0 -> integer path in ROW_GROUPS, else bf16 planes per row. On the
    integer path the rows' e8m0 scales (one byte per 32 weights, a stream of its own at
    1/16 of the weight bytes, read in bursts of a group's rows) are prefetched with `pf`'s
    locality SCALE_AHEAD groups of 4 rows ahead, and those of the first groups on entry."""
    f = Fn("define void @dsv4_avx512_fp4(ptr %w, ptr %s, ptr %x, ptr %y, i64 %nrows, i64 %K, "
           "i64 %nterms, i64 %row0, i64 %b0, i64 %b1, i64 %scols)")
    ng = f("lshr i64 %K, 5")
    buf = f(f"alloca float, i64 {f('and i64 ' + f(f'add i64 {ng}, 15') + ', -16')}, align 64")  # bf16 path scales

    def at(f, r):
        off = f(f"mul i64 {r}, {ng}")
        return f.gep("i8", "%w", f(f"shl i64 {off}, 4")), f.gep("i8", "%s", off), f.gep("float", "%y", r)
    f.cbr(f("icmp eq i64 %nterms, 0"), "%int", "%bf")
    f.label("int")
    ahead = SCALE_AHEAD * ROW_GROUPS[0]                               # rows
    pf.span(f, "%s", f(f"mul i64 {ng}, {ahead}"), "spf0")

    lo, span, ok = _factor_exponents(f, ng)

    def group(nr, first):
        def body(f, i, _):
            base = f(f"add i64 {first}, {f(f'mul i64 {i}, {nr}')}")
            rows = [at(f, f(f"add i64 {base}, {j}")) for j in range(nr)]
            pf.span(f, at(f, f(f"add i64 {base}, {ahead}"))[1], f(f"mul i64 {ng}, {nr}"), f"spf{nr}")
            args = ", ".join(f"ptr {w}, ptr {s}, ptr {y}" for w, s, y in rows)
            fast = ok
            for _, s_, _ in rows:
                fast = f(f"and i1 {fast}, {f(f'call i1 @avx512_e8m0_in(ptr {s_}, i64 {ng}, i8 {lo}, i8 {span})')}")
            edge = f(f"xor i1 {fast}, true")
            f.cbr(edge, f"%slow{nr}", f"%fast{nr}")
            f.label(f"slow{nr}")
            f.put(f"call void @avx512_fp4_int{nr}({args}, ptr %x, i64 {ng})")
            f.br(f"%j{nr}")
            f.label(f"fast{nr}")
            f.put(f"call void @avx512_fp4_int{nr}f({args}, ptr %x, i64 {ng})")
            f.br(f"%j{nr}")
            f.label(f"j{nr}")
            return []
        return body
    done = "0"
    for nr in ROW_GROUPS:                    # 4 rows per pass, then at most one pair and one row
        left = f(f"sub i64 %nrows, {done}")
        n = f(f"udiv i64 {left}, {nr}")
        counted_loop(f, n, group(nr, done), [], f"rows{nr}")
        done = f(f"add i64 {done}, {f(f'mul i64 {n}, {nr}')}")
    f.br("%done")
    f.label("bf")

    def row(f, r, _):
        w, s, y = at(f, r)
        f.put(f"store float {by_nterms(f, 'avx512_fp4_row', f'ptr {w}, ptr {s}, ptr %x, i64 {ng}, ptr {buf}')}, "
              f"ptr {y}, align 4")
        return []
    counted_loop(f, "%nrows", row, [], "rows")
    f.br("%done")
    f.label("done")
    f.put("ret void")
    return f.end()


def functions(pf: Prefetch) -> list[str]:
    return [_scale_range()] + [_fp4_int_rows(nr, fast, pf) for nr in ROW_GROUPS for fast in (False, True)]
