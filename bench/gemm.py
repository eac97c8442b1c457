"""Prefill GEMMs alone: the bf16 GEMM (kernels/gemm.py; vdpbf16ps tiles, and AMX tiles where
the CPU has them) and the dequantize + sgemm path against numpy's sgemm on the same shapes,
measured in the same run.

Shapes are the Flash matmuls of a 512-token prefill: routed-expert w1/w3 and w2 at the
~96 tokens an expert gets on average (6 of 32 experts) and at 512, the FP8 attention
projections wq_b and wo_b at 512. x is e4m3-quantized (the model's default rounding
steps), so the bf16 GEMM applies. GF/s count 2*M*O*K per call; each call includes what the
backend does per call (packing x for the bf16 GEMM; dequantizing W for the sgemm path). The
ceiling is `x @ W^T` with W already float32 (numpy's BLAS with the same thread count),
timed right before and after each row; the ratio divides by their mean. Threading is set
as the CLI sets it (OpenMP pinned, OPENBLAS_THREAD_TIMEOUT=4, GOMP_SPINCOUNT=30000). The bf16 GEMM can
exceed 100%: on Zen 4 vdpbf16ps does twice the products per cycle of float32 FMAs (on the
Intel Xeon of the twelfth session half as many), and one AMX tdpbf16ps does 8192.

    python bench/gemm.py --threads 1 2 --out bench/results/gemm-zen4.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dsv4.runtime.threads import threading_env

for _k, _v in threading_env("omp").items():     # the CLI's settings, before NumPy and Numba load
    os.environ.setdefault(_k, _v)

import numba  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

SHAPES = [  # name, format, M tokens, O, K
    ("expert w1 (M 96)", "fp4", 96, 2048, 4096),
    ("expert w2 (M 96)", "fp4", 96, 4096, 2048),
    ("expert w1 (M 512)", "fp4", 512, 2048, 4096),
    ("attn wq_b", "fp8", 512, 32768, 1024),
    ("attn wo_b", "fp8", 512, 4096, 8192),
]


def _time(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _gf(flops: float, times: list[float]) -> tuple[float, float]:
    r = flops / np.asarray(times) / 1e9
    return float(r.mean()), float(r.std(ddof=1)) if r.size > 1 else 0.0


def row(name, fmt, M, O, K, threads, reps, rng):
    from dsv4.quant.blocks import act_quant_values
    from dsv4.runtime.kernels import cpu, gemm
    from dsv4.runtime.kernels.dequant import dequant_rows
    from dsv4.runtime.kernels.selfcheck import problem
    from dsv4.runtime.linear import LinearW
    W, S, _ = problem(fmt, rng, O, K)
    lw = LinearW(name, fmt, W, S, O, K)
    x = act_quant_values(rng.standard_normal((M, K)).astype(np.float32), 128)
    Wf = dequant_rows(lw, 0, O, np.empty((O, K), np.float32))
    out = np.empty((M, O), np.float32)
    scratch = np.empty((O, K), np.float32)

    def bf16(amx):
        return lambda: gemm.gemm_into(gemm.PackedX.pack(x), fmt, W, S, out, amx=amx)

    def sgemm_path():
        np.matmul(x, dequant_rows(lw, 0, O, scratch).T, out=out)

    def ceiling():
        np.matmul(x, Wf.T, out=out)
    flops = 2.0 * M * O * K
    c0 = _gf(flops, _time(ceiling, reps))[0]
    g = _gf(flops, _time(bf16(False), reps))
    a = _gf(flops, _time(bf16(True), reps)) if cpu.amx_ready() else None
    d = _gf(flops, _time(sgemm_path, reps))
    c1 = _gf(flops, _time(ceiling, reps))[0]
    c = (c0 + c1) / 2
    amx, amx_ratio = ("-", "-") if a is None else (f"{a[0]:.1f} ± {a[1]:.1f}", f"**{a[0] / c:.0%}**")
    return (f"| {name} | {fmt} | {M}x{O}x{K} | {threads} | {g[0]:.1f} ± {g[1]:.1f} | {amx} | {d[0]:.1f} ± {d[1]:.1f} "
            f"| {c0:.1f} / {c1:.1f} | {g[0] / c:.0%} | {amx_ratio} | {d[0] / c:.0%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    from dsv4.runtime.kernels import gemv
    if gemv.kernels().variant != "avx512":
        print("the bf16 GEMM needs the avx512 kernel variant; this CPU uses "
              f"{gemv.kernels().variant}", file=sys.stderr)
        return 1
    from dsv4.cli.bench import machine_description
    lines = ["# prefill GEMMs vs numpy sgemm", "", f"machine: `{json.dumps(machine_description())}`", "",
             "Command: `python " + " ".join(["bench/gemm.py"] + (argv or sys.argv[1:])) + "`", "",
             "| matmul | format | M x O x K | threads | vdpbf16ps GEMM GF/s | AMX GEMM GF/s | "
             "dequant + sgemm GF/s | sgemm (float32 W) before / after | vdpbf16ps ratio | AMX ratio | "
             "dequant + sgemm ratio |",
             "|" + "---|" * 11]
    rng = np.random.default_rng(0)
    for t in args.threads:
        numba.set_num_threads(t)
        with threadpool_limits(t, user_api="blas"):
            for shape in SHAPES:
                lines.append(row(*shape, t, args.reps, rng))
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
