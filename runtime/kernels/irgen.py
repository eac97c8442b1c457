"""A tiny LLVM IR text builder shared by the hand-written kernels (ir_avx2.py, ir_avx512.py).

`Fn` appends SSA lines and hands out fresh value names; loops are written with `phi`
placeholders that are closed once the back-edge value exists. Only textual IR is produced:
ir.py parses it with llvmlite and links it into Numba's own code library.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np


def vec(ty: str, vals) -> str:
    """A constant vector, e.g. vec('i8', [1, 2]) -> '<i8 1, i8 2>'."""
    return "<" + ", ".join(f"{ty} {v}" for v in vals) + ">"


def splat(ty: str, n: int, v) -> str:
    return vec(ty, [v] * n)


def i8s(vals) -> list[int]:
    """Bytes 0..255 written as the signed i8 literals LLVM expects."""
    return [int(v) - 256 if int(v) > 127 else int(v) for v in vals]


def bf16_bits(values) -> np.ndarray:
    """float32 values that are exact in bf16 -> their 16-bit patterns (uint16)."""
    b = np.asarray(values, np.float32).view(np.uint32)
    if np.any(b & 0xFFFF):
        raise ValueError("value not exact in bf16")
    return (b >> 16).astype(np.uint16)


class Prefetch(NamedTuple):
    """The software prefetch of the weight streams: one per 64-byte line, `distance` bytes
    ahead, with llvm.prefetch's `locality` (2: prefetcht1, 0: prefetchnta)."""
    distance: int
    locality: int

    def put(self, f: "Fn", p: str, extra: int = 0) -> None:
        """Prefetch the line `distance + extra` bytes after pointer p."""
        ahead = f.gep("i8", p, self.distance + extra)
        f.put(f"call void @llvm.prefetch.p0(ptr {ahead}, i32 0, i32 {self.locality}, i32 1)")

    def span(self, f: "Fn", p: str, nbytes: str, tag: str) -> None:
        """Prefetch (same locality, no distance) every line of the nbytes (i64 value) bytes
        at pointer p: one per 64 bytes, then the last byte's line (p may be unaligned).
        A prefetch never faults, so the span may run past the end of an array."""
        def line(f, i, _):
            at = f.gep("i8", p, f(f"shl i64 {i}, 6"))
            f.put(f"call void @llvm.prefetch.p0(ptr {at}, i32 0, i32 {self.locality}, i32 1)")
            return []
        counted_loop(f, f(f"lshr i64 {nbytes}, 6"), line, [], tag)
        end = f.gep("i8", p, f(f"sub i64 {nbytes}, 1"))
        f.put(f"call void @llvm.prefetch.p0(ptr {end}, i32 0, i32 {self.locality}, i32 1)")


E8M0_NAN_BITS = 0x7FC00000   # e8m0 255 is NaN
E8M0_MIN_BITS = 0x00400000   # e8m0 0 is 2^-127, a float32 subnormal


class Fn:
    """One IR function under construction: `f(rhs)` emits `%vN = rhs` and returns '%vN'."""

    def __init__(self, header: str):
        self.lines = [header + " {", "entry:"]
        self.k = 0
        self.block = "%entry"
        self._open: dict[str, int] = {}

    def new(self) -> str:
        self.k += 1
        return f"%v{self.k}"

    def __call__(self, rhs: str) -> str:
        name = self.new()
        self.lines.append(f"  {name} = {rhs}")
        return name

    def put(self, line: str) -> None:
        self.lines.append("  " + line)

    def label(self, name: str) -> str:
        """Start a new basic block; returns its '%name'."""
        self.lines.append(f"{name}:")
        self.block = "%" + name
        return self.block

    def br(self, target: str) -> None:
        self.put(f"br label {target}")

    def cbr(self, cond: str, yes: str, no: str) -> None:
        self.put(f"br i1 {cond}, label {yes}, label {no}")

    def phi(self, ty: str, init: str, init_block: str) -> str:
        """A loop-carried value; its back edge is set later with `close`."""
        name = self.new()
        self.lines.append(f"  {name} = phi {ty} [{init}, {init_block}], @@{name}@@")
        self._open[name] = len(self.lines) - 1
        return name

    def close(self, name: str, value: str, block: str) -> None:
        i = self._open.pop(name)
        self.lines[i] = self.lines[i].replace(f"@@{name}@@", f"[{value}, {block}]")

    def masked_load(self, ty: str, ptr: str, mask: str, passthru: str = "zeroinitializer", align: int = 1) -> str:
        """llvm.masked.load of vector type ty ('<64 x i8>'); the intrinsic must be declared."""
        n, elt = re.match(r"<(\d+) x (\w+)>", ty).groups()
        name = f"v{n}{'f32' if elt == 'float' else elt}"
        return self(f"call {ty} @llvm.masked.load.{name}.p0(ptr {ptr}, i32 {align}, <{n} x i1> {mask}, {ty} {passthru})")

    def merge(self, ty: str, pairs) -> str:
        return self("phi " + ty + " " + ", ".join(f"[{v}, {b}]" for v, b in pairs))

    def gep(self, ty: str, base: str, idx) -> str:
        return self(f"getelementptr {ty}, ptr {base}, i64 {idx}")

    def splat(self, ty: str, n: int, scalar: str) -> str:
        v = self(f"insertelement <{n} x {ty}> poison, {ty} {scalar}, i64 0")
        return self(f"shufflevector <{n} x {ty}> {v}, <{n} x {ty}> poison, <{n} x i32> zeroinitializer")

    def e8m0(self, byte: str, n: int = 0) -> str:
        """e8m0 byte(s) (i8 or <n x i8>) -> float(s) 2^(b-127); 0 -> 2^-127, 255 -> NaN."""
        t8, t32, tf = ("i8", "i32", "float") if n == 0 else (f"<{n} x i8>", f"<{n} x i32>", f"<{n} x float>")
        c = (lambda v: str(v)) if n == 0 else (lambda v: splat("i32", n, v))
        c8 = (lambda v: str(v)) if n == 0 else (lambda v: splat("i8", n, v))
        t1 = "i1" if n == 0 else f"<{n} x i1>"
        z = self(f"zext {t8} {byte} to {t32}")
        sh = self(f"shl {t32} {z}, {c(23)}")
        is0 = self(f"icmp eq {t8} {byte}, {c8(0)}")
        isn = self(f"icmp eq {t8} {byte}, {c8(-1)}")
        a = self(f"select {t1} {is0}, {t32} {c(E8M0_MIN_BITS)}, {t32} {sh}")
        b = self(f"select {t1} {isn}, {t32} {c(E8M0_NAN_BITS)}, {t32} {a}")
        return self(f"bitcast {t32} {b} to {tf}")

    def end(self) -> str:
        if self._open:
            raise RuntimeError(f"unclosed phi nodes: {sorted(self._open)}")
        self.lines.append("}")
        return "\n".join(self.lines)


def counted_loop(f: Fn, n: str, body, carried: list[tuple[str, str]], tag: str):
    """for i in range(n): carried = body(i, carried). Returns the final carried values.

    `body(f, i, values) -> new values`; values are (type, init) pairs; n is an i64 value.
    """
    pre = f.block
    has = f(f"icmp sgt i64 {n}, 0")
    f.cbr(has, f"%{tag}", f"%{tag}_x")
    f.label(tag)
    i = f.phi("i64", "0", pre)
    cur = [f.phi(ty, init, pre) for ty, init in carried]
    new = body(f, i, cur)
    i2 = f(f"add i64 {i}, 1")
    last = f.block
    f.close(i, i2, last)
    for c, v in zip(cur, new):
        f.close(c, v, last)
    more = f(f"icmp slt i64 {i2}, {n}")
    f.cbr(more, f"%{tag}", f"%{tag}_x")
    f.label(f"{tag}_x")
    return [f.merge(ty, [(init, pre), (v, last)]) for (ty, init), v in zip(carried, new)]


def mask_first(f: Fn, n: int, count: str) -> str:
    """<n x i1> with the first `count` (i64, may exceed n) lanes set."""
    c = f(f"trunc i64 {count} to i32")
    s = f.splat("i32", n, c)
    return f(f"icmp ugt <{n} x i32> {s}, {vec('i32', range(n))}")


def vsum(f: Fn, accs: list[str], ty: str = "<16 x float>") -> str:
    s = accs[0]
    for a in accs[1:]:
        s = f(f"fadd {ty} {s}, {a}")
    return s


def choose(f: Fn, cond: str, yes, no, ty: str = "float") -> str:
    """cond ? yes(f) : no(f), each emitting its own blocks; returns the merged value."""
    tag = f.new()[1:]
    f.cbr(cond, f"%{tag}_y", f"%{tag}_n")
    vals = []
    for side, fn in (("y", yes), ("n", no)):
        f.label(f"{tag}_{side}")
        vals.append((fn(f), f.block))
        f.br(f"%{tag}_j")
    f.label(f"{tag}_j")
    return f.merge(ty, vals)


def branch(f: Fn, cond: str, yes, no) -> None:
    """if cond: yes(f) else: no(f), each emitting its own blocks, no value merged."""
    tag = f.new()[1:]
    f.cbr(cond, f"%{tag}_y", f"%{tag}_n")
    for side, fn in (("y", yes), ("n", no)):
        f.label(f"{tag}_{side}")
        fn(f)
        f.br(f"%{tag}_j")
    f.label(f"{tag}_j")


def by_nterms(f: Fn, name: str, args: str, cases=(1, 2, 3)) -> str:
    """float @{name}{nt}(args) for nt = %nterms (anything not in cases -> the last case),
    one switch per call."""
    tag = f.new()[1:]
    other = " ".join(f"i64 {n}, label %{tag}_{n}" for n in cases[:-1])
    f.put(f"switch i64 %nterms, label %{tag}_{cases[-1]} [ {other} ]")
    vals = []
    for nt in cases:
        f.label(f"{tag}_{nt}")
        vals.append((f(f"call float @{name}{nt}({args})"), f.block))
        f.br(f"%{tag}_j")
    f.label(f"{tag}_j")
    return f.merge("float", vals)


def fp4_int_in_order(f: Fn, x: str, nfull: str, block, accs: list[tuple[str, str]]) -> list[str]:
    """Walk the full blocks of x in the prep.fp4_int layout (header at x: word 0 the number
    n2 of two-digit blocks, words 2.. the original block of each stored block; the two-digit
    blocks are stored first, then the three-digit ones, each list ascending) in weight order.
    block(f, p, o, accs, planes) adds stored block p = original block o to accs and returns
    them; accs: [(type, initial value)]. Three-digit block j (original block o3) follows the
    o3 - j two-digit blocks before it. Taking the lists one after the other instead revisits
    each row's skipped blocks at its end (10.8 -> 13.8 GB/s from memory for the avx512 kernel,
    one thread). Returns the accumulators."""
    types = [t for t, _ in accs]
    n2 = f(f"sext i32 {f(f'load i32, ptr {x}, align 4')} to i64")

    def order(f, p):
        op = f.gep("i32", x, f(f"add i64 {p}, 2"))
        return f(f"sext i32 {f(f'load i32, ptr {op}, align 4')} to i64")

    def listed(first):
        def body(f, i, cur):
            p = f(f"add i64 {first}, {i}")
            return block(f, p, order(f, p), cur, 2)
        return body

    def segment(f, j, carry):
        cur, done2 = carry[:-1], carry[-1]
        q = f(f"add i64 {n2}, {j}")
        o3 = order(f, q)
        end2 = f(f"sub i64 {o3}, {j}")
        cur = counted_loop(f, f(f"sub i64 {end2}, {done2}"), listed(done2), list(zip(types, cur)), "two")
        return block(f, q, o3, cur, 3) + [end2]
    carry = counted_loop(f, f(f"sub i64 {nfull}, {n2}"), segment, accs + [("i64", "0")], "three")
    cur, done2 = carry[:-1], carry[-1]
    return counted_loop(f, f(f"sub i64 {n2}, {done2}"), listed(done2), list(zip(types, cur)), "twoend")
