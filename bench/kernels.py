"""Micro-benchmark of the gemv kernels against the memory bandwidth measured in the same run.

For every kernel variant, format and x kind, one timed call streams 32 matrices of one
Flash expert shape ([2048, 4096] or [4096, 2048]) in a single parallel region, so the
working set (136 MB for fp4 up to 1 GB for f32) is far beyond L3 and nothing stays cached.
The matrices lie on 2 MB pages, as the runtime's weights do (the share is printed).
GB/s counts weight + scale bytes. Right before and after each measurement the bandwidth
ceiling is measured with the same thread count (a float64 Numba prange sum over 1 GiB);
the ratio divides by their mean. Compile (or cache load) time of the first call is reported
apart. `--startup` measures cold and warm start (import + first call of every kernel) in
fresh processes.

    python bench/kernels.py --threads 1 2 --out bench/results/kernels-zen4.md
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

for _k, _v in {"OMP_WAIT_POLICY": "active", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores",
               "OPENBLAS_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)        # before Numba starts its thread pool

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

SHAPES = [(2048, 4096), (4096, 2048)]
BW_BYTES = 1 << 30


@njit(parallel=True, fastmath=True, cache=True)
def _sum64(a):
    nt = 64
    chunk = (a.size + nt - 1) // nt
    out = np.zeros(nt)
    for t in prange(nt):
        b = a[t * chunk:min(a.size, (t + 1) * chunk)]
        acc = 0.0
        for i in range(b.size):
            acc += b[i]
        out[t] = acc
    return out.sum()


def bandwidth(buf: np.ndarray, reps: int = 3) -> float:
    """Best of `reps` float64 prange sums over buf (GB/s)."""
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        _sum64(buf)
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def on_huge_pages(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Copies of `arrays`, packed at 64-byte offsets into one anonymous mapping that starts on
    a 2 MB boundary and is advised for 2 MB pages, as the runtime's weights are (97-99% on 2 MB
    pages in `dsv4 bench`). Separate NumPy copies of a few MB each start anywhere in a 4 KB
    page, so only their aligned 2 MB stretches can be huge pages: about half of a table of
    4 MB matrices, which costs TLB walks the runtime does not pay."""
    import mmap
    from dsv4.runtime.pages import HUGE, advise_huge
    offs, size = [], 0
    for a in arrays:
        offs.append(size)
        size += -(-a.nbytes // 64) * 64
    mem = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise_huge(mem)
    raw = np.frombuffer(mem, np.uint8)
    start = -raw.ctypes.data % HUGE
    out = []
    for a, o in zip(arrays, offs):
        v = raw[start + o:start + o + a.nbytes].view(a.dtype).reshape(a.shape)
        v[...] = a
        out.append(v)
    return out


def make_table(fmt: str, shape, count: int, rng):
    """`count` matrices of one shape on 2 MB pages (two random ones, alternating), their
    bytes, and the pages of the weights' mapping (runtime.pages.MappedPages or None)."""
    from dsv4.runtime.kernels.gemv import MatTable
    from dsv4.runtime.kernels.selfcheck import problem
    from dsv4.runtime.pages import memory_pages
    O, K = shape
    base = [problem(fmt, rng, O, K)[:2] for _ in range(2)]
    Ws = on_huge_pages([base[i % 2][0] for i in range(count)])
    Ss = None if base[0][1] is None else on_huge_pages([base[i % 2][1] for i in range(count)])
    nbytes = sum(w.nbytes for w in Ws) + (0 if Ss is None else sum(s.nbytes for s in Ss))
    return MatTable(fmt, Ws, Ss), nbytes, memory_pages(Ws[:1])


def x_for(kind: str, K: int, rng) -> np.ndarray:
    """Activation-like x: Gaussian with 1% outliers x20; 'quantized' = the model's default
    e4m3 activation quantization (per 128), 'bf16' = rounded to bf16 (the inputs of the
    model's bf16 matrices in default mode), 'exact' = arbitrary float32 (exact mode)."""
    from dsv4.quant.formats import bf16_round
    from dsv4.runtime.kernels.actq import act_quant_values
    x = (rng.standard_normal(K) * np.where(rng.random(K) < 0.01, 20.0, 1.0)).astype(np.float32)
    if kind == "quantized":
        return act_quant_values(x[None])[0]
    return bf16_round(x) if kind == "bf16" else x


def measure(k, table, nbytes, xp, reps: int, bwbuf) -> dict:
    mats = np.arange(len(table))
    t = time.perf_counter()
    k.gemv_batch(table, mats, xp)                      # compile / cache load + first touch
    first = time.perf_counter() - t
    bw0 = bandwidth(bwbuf)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        k.gemv_batch(table, mats, xp)
        ts.append(time.perf_counter() - t)
    bw1 = bandwidth(bwbuf)
    gbs = nbytes / np.array(ts) / 1e9
    return {"gbs": gbs.mean(), "sd": gbs.std(ddof=1), "best": gbs.max(), "bw0": bw0, "bw1": bw1,
            "ratio": gbs.mean() / ((bw0 + bw1) / 2), "first": first}


def call_overhead(k, reps: int = 2000) -> float:
    """Per-call time of gemv_batch on 13 tiny fp4 jobs (the MoE step's shape of call), us."""
    from dsv4.runtime.kernels.gemv import MatTable
    rng = np.random.default_rng(0)
    W = rng.integers(0, 256, (1, 16), dtype=np.uint8)
    S = np.full((1, 1), 127, np.uint8)
    table = MatTable("fp4", [W] * 13, [S] * 13)
    xp = k.prepare_x("fp4", np.ones(32, np.float32))
    mats = np.arange(13)
    k.gemv_batch(table, mats, xp)
    t = time.perf_counter()
    for _ in range(reps):
        k.gemv_batch(table, mats, xp)
    return (time.perf_counter() - t) / reps * 1e6


def run(args) -> list[str]:
    from dsv4.runtime.kernels import gemv
    from dsv4.runtime.kernels.cpu import VARIANTS, host_features, unmet
    rng = np.random.default_rng(0)
    bwbuf = np.ones(BW_BYTES // 8)
    variants = [v for v in (args.variants or VARIANTS) if not unmet(v, host_features())]
    rows, notes = [], []
    for fmt in args.formats:
        count = args.count if fmt != "f32" else args.count // 2
        for shape in SHAPES:
            table, nbytes, pages = make_table(fmt, shape, count, rng)
            if pages is not None:
                note = f"- {fmt} {shape[0]}x{shape[1]} table: {100 * pages.share:.0f}% on 2 MB pages"
                print(note, flush=True)
                notes.append(note)
            kinds = {"fp4": ("quantized", "exact"), "fp8": ("quantized", "exact"), "bf16": ("bf16", "exact")}
            for kind in kinds.get(fmt, ("exact",)):
                x = x_for(kind, shape[1], rng)
                for v in variants:
                    k = gemv.Kernels(v)
                    xp = k.prepare_x(fmt, x)
                    if fmt == "fp4" and xp.nterms == 0 and v == variants[0]:      # fp4 integer layout header
                        n2, nfull = xp.data[0, :2].view(np.int32)
                        note = f"- fp4 {shape[0]}x{shape[1]} quantized x: {n2} of {nfull} blocks need 2 digits (rest 3)"
                        print(note, flush=True)
                        notes.append(note)
                    for nt in args.threads:
                        numba.set_num_threads(nt)
                        if v == "numba" and (nt > 1 or fmt == "f32"):
                            continue
                        r = measure(k, table, nbytes, xp, args.reps, bwbuf)
                        line = (f"| {fmt} | {shape[0]}x{shape[1]} | {kind} | {v} | {xp.nterms} | {nt} | "
                                f"{r['gbs']:.1f} ± {r['sd']:.1f} | {r['best']:.1f} | {r['bw0']:.1f} / {r['bw1']:.1f} | "
                                f"**{100 * r['ratio']:.0f}%** | {r['first']:.2f} |")
                        print(line, flush=True)
                        rows.append(line)
            del table
    rows += [""] + notes
    for v in variants:
        for nt in args.threads:
            numba.set_num_threads(nt)
            line = f"- per-call time of gemv_batch, 13 tiny fp4 jobs, {v}, {nt} thread(s): {call_overhead(gemv.Kernels(v)):.1f} us"
            print(line, flush=True)
            rows.append(line)
    return rows


STARTUP = """
import time; t0 = time.perf_counter()
import numpy as np
from dsv4.runtime.kernels import gemv
from dsv4.runtime.kernels.actq import act_quant_values
t1 = time.perf_counter()
k = gemv.kernels()
x = act_quant_values(np.ones((1, 256), np.float32))
rng = np.random.default_rng(0)
from dsv4.runtime.kernels.selfcheck import problem
for fmt in ("fp4", "fp8", "bf16", "f32"):
    W, S, _ = problem(fmt, rng, 64, 256)
    k.gemv(fmt, W, S, k.prepare_x(fmt, x[0]))
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {k.variant}")
"""


def startup() -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        for label in ("cold (empty NUMBA_CACHE_DIR)", "warm (second process)", "warm (third process)"):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", STARTUP], env=env, capture_output=True, text=True,
                                 check=True)
            wall = time.perf_counter() - t
            imp, first, variant = res.stdout.split()
            line = (f"| {label} | {variant} | {float(imp):.2f} | {float(first):.2f} | {wall:.2f} |")
            print(line, flush=True)
            out.append(line)
    return out


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    pick = [ln for ln in lscpu.splitlines() if ln.split(":")[0].strip() in
            ("Model name", "CPU family", "Model", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
             "Hypervisor vendor")]
    import llvmlite
    from dsv4.runtime.kernels import gemv
    from dsv4.runtime.kernels.cpu import host_cpu
    return "\n".join(["```"] + pick + [
        f"LLVM host cpu: {host_cpu()}; python {platform.python_version()}, numpy {np.__version__}, "
        f"numba {numba.__version__}, llvmlite {llvmlite.__version__}",
        gemv.describe(), "```"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", nargs="+", default=["fp4", "fp8", "bf16", "f32"])
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--count", type=int, default=32, help="matrices per call (per shape)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--startup", action="store_true", help="only measure cold / warm start")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    head = ["| format | shape O x K | x | variant | nterms | threads | GB/s mean ± sd | best | "
            "BW before / after | ratio | first call s |", "|" + "---|" * 11]
    sections = ["# gemv kernels vs memory bandwidth", "", machine(), "",
                "Command: `python " + " ".join(["bench/kernels.py"] + (argv or sys.argv[1:])) + "`", ""]
    if not args.startup:
        sections += head + run(args) + [""]
    sections += ["| start | variant | import s | first calls s | process wall s |", "|---|---|---|---|---|"]
    sections += startup()
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
