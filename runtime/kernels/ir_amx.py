"""AMX tile kernel for the prefill GEMM (linked into the avx512 IR module when the code
generator's target has AMX-TILE and AMX-BF16; driver: gemm.py).

`dsv4_avx512_amx_tile(wb, K, xp, mpad, c, ldc, nj)`: c[r * ldc + m] = sum_k wb[r, k] x[m, k]
for 16 decoded weight rows (wb: bf16 [16, K], K a multiple of 32) and 16 * nj token lanes
(nj 1..4) of x packed as bf16 pairs xp[k / 2, m] (uint32, mpad lanes per pair row), the
same operands as `dsv4_avx512_bf16_tile` of ir_gemm.py. Per step of 32 k: one A tile (16
weight rows x 32 bf16, rows 2K bytes apart) and per lane block one B tile (16 pair rows x
16 lanes, rows 4 * mpad bytes apart, which is the VNNI layout the packing already makes),
`tdpbf16ps` into one of four C tiles (16 rows x 16 lanes, float32). The products are exact
and summed in float32, like vdpbf16ps (which also treats bf16 subnormals as zero: the
callers pass only normal numbers). One `tdpbf16ps` does 16 x 16 x 32 products.

Tile registers: C in 0 .. nj-1, A in nj, B alternating in nj+1 / nj+2; the tile
configuration (palette 1, every used tile 16 rows x 64 bytes) is loaded on entry and
released on exit, so a call leaves no tile state behind. Linux hands a process the AMX
register state only after arch_prctl(ARCH_REQ_XCOMP_PERM) (cpu.amx_ready).

Without AMX in the target the function is a trap: the driver calls it only when
cpu.amx_ready() says so.
"""
from __future__ import annotations

NJ = 4          # lane blocks of 16 per call (C tiles)
ROWS = 16       # weight rows per call (A tile rows)

DECLS = """
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1 immarg)
"""
SIGNATURE = "(ptr %wb, i64 %K, ptr %xp, i64 %mpad, ptr %c, i64 %ldc, i64 %nj)"
PARAMS = {"dsv4_avx512_amx_tile": "pipipii"}


def _config(ntiles: int) -> list[str]:
    """Load a palette-1 configuration: tiles 0 .. ntiles-1 of 16 rows x 64 bytes."""
    out = ["  %cfg = alloca [64 x i8], align 64",
           "  call void @llvm.memset.p0.i64(ptr %cfg, i8 0, i64 64, i1 false)",
           "  store i8 1, ptr %cfg"]
    for t in range(ntiles):
        out += [f"  %colsb{t} = getelementptr i8, ptr %cfg, i64 {16 + 2 * t}", f"  store i16 64, ptr %colsb{t}",
                f"  %rows{t} = getelementptr i8, ptr %cfg, i64 {48 + t}", f"  store i8 {ROWS}, ptr %rows{t}"]
    return out + ["  call void @llvm.x86.ldtilecfg(ptr %cfg)"]


def _tile(nj: int) -> str:
    a = nj                                                   # tile numbers: C 0..nj-1, A, B, B
    body = [f"define internal void @amx_tile{nj}(ptr %wb, i64 %K, ptr %xp, i64 %mpad, ptr %c, i64 %ldc) {{",
            "entry:"] + _config(nj + 3)
    body += [f"  call void @llvm.x86.tilezero(i8 {j})" for j in range(nj)]
    body += ["  %nk = lshr i64 %K, 5",
             "  %sa = shl i64 %K, 1",                        # A: weight rows, 2K bytes apart
             "  %sb = shl i64 %mpad, 2",                     # B: pair rows, 4 * mpad bytes apart
             "  %sb16 = shl i64 %sb, 4",
             "  br label %loop",
             "loop:",
             "  %k = phi i64 [0, %entry], [%k1, %loop]",
             "  %ao = shl i64 %k, 6",
             "  %ap = getelementptr i8, ptr %wb, i64 %ao",
             f"  call void @llvm.x86.tileloadd64(i8 {a}, ptr %ap, i64 %sa)",
             "  %bo = mul i64 %k, %sb16",
             "  %bp = getelementptr i8, ptr %xp, i64 %bo"]
    for j in range(nj):
        b = nj + 1 + (j & 1)
        body += [f"  %bp{j} = getelementptr i8, ptr %bp, i64 {64 * j}",
                 f"  call void @llvm.x86.tileloadd64(i8 {b}, ptr %bp{j}, i64 %sb)",
                 f"  call void @llvm.x86.tdpbf16ps(i8 {j}, i8 {a}, i8 {b})"]
    body += ["  %k1 = add i64 %k, 1",
             "  %more = icmp ult i64 %k1, %nk",
             "  br i1 %more, label %loop, label %done",
             "done:",
             "  %sc = shl i64 %ldc, 2"]
    for j in range(nj):
        body += [f"  %cp{j} = getelementptr i8, ptr %c, i64 {64 * j}",
                 f"  call void @llvm.x86.tilestored64(i8 {j}, ptr %cp{j}, i64 %sc)"]
    return "\n".join(body + ["  call void @llvm.x86.tilerelease()", "  ret void", "}"])


def functions(enabled: bool) -> list[str]:
    """The exported tile function (a trap when the target has no AMX)."""
    head = f"define void @dsv4_avx512_amx_tile{SIGNATURE} {{"
    if not enabled:
        return [f"declare void @llvm.trap()\n\n{head}\n  call void @llvm.trap()\n  unreachable\n}}"]
    cases = " ".join(f"i64 {nj}, label %n{nj}" for nj in range(1, NJ))
    export = [head, f"  switch i64 %nj, label %n{NJ} [ {cases} ]"]
    for nj in range(1, NJ + 1):
        export += [f"n{nj}:", f"  call void @amx_tile{nj}(ptr %wb, i64 %K, ptr %xp, i64 %mpad, ptr %c, i64 %ldc)",
                   "  ret void"]
    return [DECLS] + [_tile(nj) for nj in range(1, NJ + 1)] + ["\n".join(export + ["}"])]
