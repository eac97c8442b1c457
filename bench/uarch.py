"""What this host's cores do per cycle: vector instruction throughput, and how much of the
memory bandwidth a streaming loop keeps as it does more work per cache line.

Each development VM so far was a different CPU (and VMs share cores with other tenants), so
the kernel notes need the numbers of the machine at hand. Two measurements, both compiled
with llvmlite's MCJIT from inline assembly and LLVM IR (no Numba):

1. **Throughput**: 8 independent ymm chains of one instruction (or a mix, e.g. `sraw,fma`)
   in a loop; instructions per core cycle. The clock comes from one chain of dependent
   `vpaddd` (latency 1, 8 per loop iteration) timed right before and after, so the numbers
   hold while the clock moves.
2. **Memory-level parallelism**: a sum over a buffer far larger than the caches (2 loads
   and 2 adds per 64-byte line) with N extra independent ALU instructions per line, with and
   without a software prefetch 16 KB ahead; GB/s and the share of the plain sum's rate.
   A kernel with more work per line than the out-of-order window covers loses bandwidth
   unless something prefetches for it.

    python bench/uarch.py [--ops shl32 fma sraw,fma ...] [--extra 0 8 16 24] [--rounds 5]

On a VM whose vCPU shares a physical core with another tenant's thread, the throughput
moves between runs (twice as high when the sibling idles): the table gives the median and
the best of alternating rounds.
"""
from __future__ import annotations

import argparse
import ctypes
import time

import llvmlite.binding as llb
import numpy as np

ASM = {   # x86 AT&T syntax, $0 = the chain's ymm register ($1 = a general register holding a buffer address;
          # load16 / load8 write a scratch register instead)
    "add": "vpaddd $0, $0, $0", "and": "vpand $0, $0, $0", "shl32": "vpslld $$3, $0, $0",
    "sraw": "vpsraw $$3, $0, $0", "pshufb": "vpshufb $0, $0, $0", "unpck": "vpunpcklbw $0, $0, $0",
    "maddubs": "vpmaddubsw $0, $0, $0", "maddwd": "vpmaddwd $0, $0, $0", "cvt": "vcvtdq2ps $0, $0",
    "fma": "vfmadd231ps $0, $0, $0", "mul": "vmulps $0, $0, $0", "fadd": "vaddps $0, $0, $0",
    "perm": "vpermd $0, $0, $0", "load": "vmovdqu {off}($1), $0", "fmaload": "vfmadd231ps {off}($1), $0, $0",
    "load16": "vmovdqu {off}($1), %xmm15", "load8": "movq {off}($1), %xmm15",
}
DEFAULT_OPS = ["add", "and", "shl32", "sraw", "pshufb", "unpck", "maddubs", "maddwd", "cvt", "fma", "mul",
               "fadd", "load", "fmaload", "shl32,fma", "pshufb,fma", "sraw,shl32", "maddubs,maddwd", "and,fma"]
CHAINS = 8


class Jit:
    """One MCJIT engine for a module text; keeps everything it needs alive."""

    def __init__(self, text: str):
        llb.initialize_native_target()
        llb.initialize_native_asmprinter()
        llb.initialize_native_asmparser()
        self.tm = llb.Target.from_default_triple().create_target_machine(
            cpu=llb.get_host_cpu_name(), features=llb.get_host_cpu_features().flatten(), opt=3)
        self.mod = llb.parse_assembly(text)
        self.mod.verify()
        self.ee = llb.create_mcjit_compiler(self.mod, self.tm)
        self.ee.finalize_object()

    def fn(self, name: str, *argtypes):
        return ctypes.CFUNCTYPE(None, *argtypes)(self.ee.get_function_address(name))


def chain_fn(name: str, ops: list[str], chains: int) -> str:
    """void name(ptr p, i64 n): n iterations, each applying `ops` in turn to every chain."""
    phis, body, fold = [], [], "zeroinitializer"
    for j in range(chains):
        phis.append(f"  %a{j} = phi <8 x i32> [zeroinitializer, %entry], [%z{j}, %loop]")
        cur = f"%a{j}"
        for t, op in enumerate(ops):
            code = ASM[op].replace("{off}", str(32 * j))     # loads: each chain its own line half
            body.append(f'  %t{j}_{t} = call <8 x i32> asm "{code}", "=x,r,0,~{{xmm15}}"(ptr %p, <8 x i32> {cur})')
            cur = f"%t{j}_{t}"
        body.append(f"  %z{j} = xor <8 x i32> {cur}, zeroinitializer")
    ends = []
    for j in range(chains):
        ends.append(f"  %f{j} = xor <8 x i32> {fold}, %z{j}")
        fold = f"%f{j}"
    return "\n".join([f"define void @{name}(ptr %p, i64 %n) {{", "entry:", "  br label %loop", "loop:",
                      "  %i = phi i64 [0, %entry], [%i2, %loop]", *phis, *body,
                      "  %i2 = add i64 %i, 1", "  %c = icmp slt i64 %i2, %n",
                      "  br i1 %c, label %loop, label %done", "done:", *ends,
                      f"  store <8 x i32> {fold}, ptr %p, align 1", "  ret void", "}"])


def stream_fn(name: str, extra: int, prefetch: int) -> str:
    """void name(ptr p, i64 lines, ptr out): sum of p's 64-byte lines with `extra`
    independent vpxor per line (4 chains) and a prefetch `prefetch` bytes ahead (0: none)."""
    ph = [f"  %x{j} = phi <8 x i32> [zeroinitializer, %entry], [%y{j}, %loop]" for j in range(4)]
    work, last = [], {j: f"%x{j}" for j in range(4)}
    for e in range(extra):
        work.append(f'  %e{e} = call <8 x i32> asm "vpxor $0, $0, $0", "=x,0"(<8 x i32> {last[e % 4]})')
        last[e % 4] = f"%e{e}"
    work += [f"  %y{j} = xor <8 x i32> {last[j]}, zeroinitializer" for j in range(4)]
    pf = [f"  %pa = getelementptr i8, ptr %q0, i64 {prefetch}",
          "  call void @llvm.prefetch.p0(ptr %pa, i32 0, i32 2, i32 1)"] if prefetch else []
    return "\n".join([f"define void @{name}(ptr %p, i64 %n, ptr %out) {{", "entry:", "  br label %loop", "loop:",
                      "  %i = phi i64 [0, %entry], [%i2, %loop]",
                      "  %a0 = phi <4 x i64> [zeroinitializer, %entry], [%b0, %loop]",
                      "  %a1 = phi <4 x i64> [zeroinitializer, %entry], [%b1, %loop]", *ph,
                      "  %o = shl i64 %i, 6", "  %q0 = getelementptr i8, ptr %p, i64 %o", *pf,
                      "  %q1 = getelementptr i8, ptr %q0, i64 32",
                      "  %v0 = load <4 x i64>, ptr %q0, align 1", "  %v1 = load <4 x i64>, ptr %q1, align 1",
                      "  %b0 = add <4 x i64> %a0, %v0", "  %b1 = add <4 x i64> %a1, %v1", *work,
                      "  %i2 = add i64 %i, 1", "  %c = icmp slt i64 %i2, %n",
                      "  br i1 %c, label %loop, label %done", "done:",
                      "  %s = add <4 x i64> %b0, %b1", "  store <4 x i64> %s, ptr %out, align 1",
                      "  ret void", "}"])


def best_time(call, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=DEFAULT_OPS,
                    help=f"instructions or comma-joined mixes, from: {' '.join(ASM)}")
    ap.add_argument("--extra", type=int, nargs="+", default=[0, 8, 16, 24], help="extra ALU ops per line")
    ap.add_argument("--mb", type=int, default=256, help="stream buffer size (MB)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the throughput runs")
    ap.add_argument("--iters", type=int, default=10_000_000, help="loop iterations per throughput run")
    args = ap.parse_args()
    unknown = sorted({o for mix in args.ops for o in mix.split(",")} - set(ASM))
    if unknown:
        ap.error(f"unknown instruction(s) {', '.join(unknown)}; choose from {' '.join(ASM)}")
    mixes = [m.split(",") for m in args.ops]
    streams = [(e, pf) for e in args.extra for pf in (0, 16384)]
    text = "\n\n".join(["declare void @llvm.prefetch.p0(ptr, i32, i32, i32)", chain_fn("clock", ["add"] * 8, 1)]
                       + [chain_fn(f"ops{i}", m, CHAINS) for i, m in enumerate(mixes)]
                       + [stream_fn(f"stream{i}", e, pf) for i, (e, pf) in enumerate(streams)])
    jit = Jit(text)
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    raw = np.zeros(96, np.int32)                  # 256 bytes on a 64-byte boundary: no load splits a line
    scratch = raw[(-raw.ctypes.data % 64) // 4:][:64]
    clock = jit.fn("clock", P, I64)
    print(f"host: {llb.get_host_cpu_name()}\n")
    print(f"| instructions | per cycle, median of {args.rounds} | best | clock GHz |\n|---|---|---|---|")
    rates: dict = {}
    for _ in range(args.rounds):                  # alternate the mixes: the sibling's load moves
        for i, mix in enumerate(mixes):
            f = jit.fn(f"ops{i}", P, I64)
            ghz = [8 * args.iters / best_time(lambda: clock(scratch.ctypes.data, args.iters)) / 1e9]
            t = best_time(lambda: f(scratch.ctypes.data, args.iters))
            ghz.append(8 * args.iters / best_time(lambda: clock(scratch.ctypes.data, args.iters)) / 1e9)
            rates.setdefault(i, []).append((len(mix) * CHAINS * args.iters / t / (np.mean(ghz) * 1e9), np.mean(ghz)))
    for i, mix in enumerate(mixes):
        r = np.array(rates[i])
        print(f"| {' + '.join(mix)} | {np.median(r[:, 0]):.2f} | {r[:, 0].max():.2f} | {np.median(r[:, 1]):.2f} |")
    buf = np.ones((args.mb << 20) // 8, np.int64)
    out = np.zeros(4, np.int64)
    lines = buf.nbytes // 64
    print(f"\n| extra ops per 64-byte line | prefetch | GB/s | share of the plain sum |\n|---|---|---|---|")
    gbs: dict = {}
    for _ in range(args.rounds):                  # alternate, keep each variant's best
        for i, key in enumerate(streams):
            f = jit.fn(f"stream{i}", P, I64, P)
            t = best_time(lambda: f(buf.ctypes.data, lines, out.ctypes.data), reps=1)
            gbs[key] = max(gbs.get(key, 0.0), buf.nbytes / t / 1e9)
    base = gbs[(args.extra[0], 0)]
    for (e, pf) in streams:
        print(f"| {e} | {'16 KB' if pf else 'none'} | {gbs[(e, pf)]:.1f} | {100 * gbs[(e, pf)] / base:.0f}% |")


if __name__ == "__main__":
    main()
