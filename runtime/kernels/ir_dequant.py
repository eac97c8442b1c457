"""AVX2 weight dequantization to float32 rows, for the prefill's dequantize + sgemm path
(linked into the avx2 IR module; driver: dequant.py). Same values as the reference
dequantization (dsv4.quant.blocks), element for element: weight value times the e8m0 scale
as one float32 multiply.

- `dsv4_avx2_dequant_fp4(w, s, out, nrows, K, ostride, nt)`: nrows MXFP4 rows (K/2 packed bytes,
  K/32 scale bytes each, K a multiple of 32) -> out rows ostride floats apart. Per group
  of 32: vpshufb maps each nibble to the int8 2*e2m1, the bytes are interleaved to element
  order and converted, halved (exact) and multiplied by the group's scale. A -0 code (8)
  comes out as +0 (the only difference to the reference: it cannot change a sum that has a
  nonzero term).
- `dsv4_avx2_dequant_fp8(w, s, out, nrows, K, ostride, row0, b0, b1, scols, nt)`: rows row0 ..
  of an FP8 matrix (w points at row row0; (b0, b1) tile scales, scols per band). A byte b
  becomes float32 bits (int32(int8 b) << 20) & 0x87F00000, which is e4m3(b) * 2^-120
  exactly (e4m3 subnormals become float32 subnormals), times 2^120 (exact) and times the
  tile's scale; NaN codes (0x7F, 0xFF) are selected as the reference's NaN. 32 bytes per
  step, the rest of a tile one at a time.

nt != 0: the 32-float stores are non-temporal (the caller makes them 32-byte aligned), for
outputs far larger than the caches: no line is read before it is written, which doubled
the rate into a 64 MB scratch on one Zen 3 core (11 -> 20 GB/s). An sfence at the end
orders them before whatever the caller does next (another thread's sgemm reads them). The
Numba loops these replace (dequant.py) wrote about 12 GB/s on two cores, a tenth of a
prefill's time.
"""
from __future__ import annotations

import numpy as np

from dsv4.quant.formats import E2M1_VALUES, E4M3_VALUES

from .irgen import Fn, counted_loop, splat, vec

PARAMS = {"dsv4_avx2_dequant_fp4": "pppiiii", "dsv4_avx2_dequant_fp8": "pppiiiiiiii"}
DECLS = """declare <16 x i8> @llvm.x86.ssse3.pshuf.b.128(<16 x i8>, <16 x i8>)
declare void @llvm.x86.sse.sfence()"""
V = "<32 x float>"
NAN_BITS = int(E4M3_VALUES[0x7F:0x80].view(np.uint32)[0])    # the reference's NaN (0x7F and 0xFF)


def _store(f: Fn, value: str, ptr: str, nt: str) -> None:
    """<32 x float> to ptr; non-temporal (ptr 32-byte aligned) where the i1 nt is set."""
    tag = f.new()[2:]
    f.cbr(nt, f"%nt{tag}", f"%st{tag}")
    f.label(f"nt{tag}")
    f.put(f"store {V} {value}, ptr {ptr}, align 32, !nontemporal !{{i32 1}}")
    f.br(f"%done{tag}")
    f.label(f"st{tag}")
    f.put(f"store {V} {value}, ptr {ptr}, align 4")
    f.br(f"%done{tag}")
    f.label(f"done{tag}")


def _fp4() -> str:
    f = Fn("define void @dsv4_avx2_dequant_fp4(ptr %w, ptr %s, ptr %out, i64 %nrows, i64 %K, i64 %ostride, i64 %nt)")
    ng = f("lshr i64 %K, 5")
    nt = f("icmp ne i64 %nt, 0")
    table = vec("i8", [int(2 * v) for v in E2M1_VALUES])
    order = vec("i32", [16 * (i % 2) + i // 2 for i in range(32)])     # lo0 hi0 lo1 hi1 ...

    def row(f, r, _):
        wr = f.gep("i8", "%w", f(f"mul i64 {r}, {f(f'shl i64 {ng}, 4')}"))
        sr = f.gep("i8", "%s", f(f"mul i64 {r}, {ng}"))
        orow = f.gep("float", "%out", f(f"mul i64 {r}, %ostride"))

        def group(f, g, _):
            b = f(f"load <16 x i8>, ptr {f.gep('i8', wr, f(f'shl i64 {g}, 4'))}, align 1")
            lo = f(f"and <16 x i8> {b}, {splat('i8', 16, 15)}")
            hi = f(f"lshr <16 x i8> {b}, {splat('i8', 16, 4)}")
            vl, vh = (f(f"call <16 x i8> @llvm.x86.ssse3.pshuf.b.128(<16 x i8> {table}, <16 x i8> {n})")
                      for n in (lo, hi))
            v = f(f"shufflevector <16 x i8> {vl}, <16 x i8> {vh}, <32 x i32> {order}")
            v = f(f"sitofp <32 x i32> {f(f'sext <32 x i8> {v} to <32 x i32>')} to {V}")
            v = f(f"fmul {V} {v}, {splat('float', 32, 0.5)}")
            sc = f.splat("float", 32, f.e8m0(f(f"load i8, ptr {f.gep('i8', sr, g)}")))
            _store(f, f(f"fmul {V} {v}, {sc}"), f.gep("float", orow, f(f"shl i64 {g}, 5")), nt)
            return []
        counted_loop(f, ng, group, [], "g")
        return []
    counted_loop(f, "%nrows", row, [], "r")
    f.put("call void @llvm.x86.sse.sfence()")        # non-temporal stores visible before the caller goes on
    f.put("ret void")
    return f.end()


def _fp8_decode(f: Fn, b: str, n: int, scale: str) -> str:
    """n e4m3 bytes (<n x i8>, or i8 when n == 0) times the float scale (splat for n > 0)."""
    t8, t32, tf = ("i8", "i32", "float") if n == 0 else (f"<{n} x i8>", f"<{n} x i32>", f"<{n} x float>")
    c = (lambda ty, v: str(v)) if n == 0 else (lambda ty, v: splat(ty, n, v))
    wide = f(f"sext {t8} {b} to {t32}")
    shifted = f(f"shl {t32} {wide}, {c('i32', 20)}")
    bits = f(f"and {t32} {shifted}, {c('i32', -2014314496)}")             # 0x87F00000
    low7 = f(f"and {t8} {b}, {c('i8', 127)}")
    nan = f(f"icmp eq {t8} {low7}, {c('i8', 127)}")
    bits = f(f"select {'i1' if n == 0 else f'<{n} x i1>'} {nan}, {t32} {c('i32', NAN_BITS)}, {t32} {bits}")
    v = f(f"bitcast {t32} {bits} to {tf}")
    v = f(f"fmul {tf} {v}, {c('float', '0x4770000000000000')}")           # 2^120
    return f(f"fmul {tf} {v}, {scale}")


def _fp8() -> str:
    f = Fn("define void @dsv4_avx2_dequant_fp8(ptr %w, ptr %s, ptr %out, i64 %nrows, i64 %K, i64 %ostride, "
           "i64 %row0, i64 %b0, i64 %b1, i64 %scols, i64 %nt)")
    nt = f("icmp ne i64 %nt, 0")
    ntiles = f(f"udiv i64 {f('add i64 %K, ' + f('sub i64 %b1, 1'))}, %b1")

    def row(f, r, _):
        wr = f.gep("i8", "%w", f(f"mul i64 {r}, %K"))
        band = f(f"udiv i64 {f(f'add i64 %row0, {r}')}, %b0")
        srow = f.gep("i8", "%s", f(f"mul i64 {band}, %scols"))
        orow = f.gep("float", "%out", f(f"mul i64 {r}, %ostride"))

        def tile(f, t, _):
            k0 = f(f"mul i64 {t}, %b1")
            left = f(f"sub i64 %K, {k0}")
            ln = f(f"select i1 {f(f'icmp slt i64 {left}, %b1')}, i64 {left}, i64 %b1")
            sc = f.e8m0(f(f"load i8, ptr {f.gep('i8', srow, t)}"))
            scv = f.splat("float", 32, sc)

            def step(f, j, _):
                k = f(f"add i64 {k0}, {f(f'shl i64 {j}, 5')}")
                b = f(f"load <32 x i8>, ptr {f.gep('i8', wr, k)}, align 1")
                _store(f, _fp8_decode(f, b, 32, scv), f.gep("float", orow, k), nt)
                return []
            counted_loop(f, f(f"lshr i64 {ln}, 5"), step, [], "v")
            k1 = f(f"add i64 {k0}, {f(f'and i64 {ln}, -32')}")

            def one(f, i, _):
                k = f(f"add i64 {k1}, {i}")
                b = f(f"load i8, ptr {f.gep('i8', wr, k)}")
                f.put(f"store float {_fp8_decode(f, b, 0, sc)}, ptr {f.gep('float', orow, k)}, align 4")
                return []
            counted_loop(f, f(f"and i64 {ln}, 31"), one, [], "e")
            return []
        counted_loop(f, ntiles, tile, [], "t")
        return []
    counted_loop(f, "%nrows", row, [], "r")
    f.put("call void @llvm.x86.sse.sfence()")        # non-temporal stores visible before the caller goes on
    f.put("ret void")
    return f.end()


def functions() -> list[str]:
    """The declarations and both exported functions, for the avx2 module."""
    return [DECLS, _fp4(), _fp8()]
