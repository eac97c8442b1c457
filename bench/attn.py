"""Benchmark of the attention-side kernels (runtime/kernels/attn.py) on Flash dimensions.

    python bench/attn.py [--threads 1,2] [--repeats 10] [--out bench/results/attn-NAME.md]

Times are mean +- sd over repeats after one warm-up call; the first call (JIT compile or
cache load) is reported apart. Ceilings measured in the same run: numpy float32 matmul
(OpenBLAS sgemm with the same thread count) on the same FLOPs, measured in a fresh
subprocess before and after the kernels (Numba's spinning OpenMP workers would slow
OpenBLAS in this process), and a float32 row gather of the same size for the KV decode.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "active")
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

SGEMM_CODE = r"""
import json, sys, time, numpy as np
from threadpoolctl import threadpool_limits
th, reps, shapes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
rng = np.random.default_rng(0)
res = {}
with threadpool_limits(th, user_api="blas"):
    for name, (m, k, n) in shapes.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
        res[name] = 2.0 * m * k * n / np.median(ts) / 1e9
print(json.dumps(res))
"""

# GEMMs with the FLOPs of each kernel: attention = scores [H,D]x[D,K] twice (QK^T, PV)
SHAPES = {"attn_decode": (64, 512, 640), "attn_swa": (64, 512, 128),
          "index_1k": (64, 128, 1024), "index_64k": (64, 128, 65536)}


def sgemm_gflops(threads: int, reps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SGEMM_CODE, str(threads), str(reps),
                          json.dumps(SHAPES)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def timeit(fn, reps):
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return first, float(np.mean(ts)), float(np.std(ts)), float(np.min(ts))


def machine() -> str:
    cpu, isa = "?", "?"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = info.split("model name", 1)[1].split(":", 1)[1].split("\n", 1)[0].strip()
        flags = info.split("\nflags", 1)[1].split("\n", 1)[0].split()
        isa = "+".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni") if x in flags)
        import llvmlite.binding as llb
        cpu += f" (host {llb.get_host_cpu_name()}, {isa})"
    except Exception:  # noqa: BLE001
        pass
    import numba
    if os.environ.get("NUMBA_CPU_NAME"):
        cpu += (f"; Numba code generated for NUMBA_CPU_NAME={os.environ['NUMBA_CPU_NAME']}"
                + (" with NUMBA_CPU_FEATURES set" if os.environ.get("NUMBA_CPU_FEATURES")
                   else ""))
    return (f"{cpu}, {os.cpu_count()} cpus, {platform.python_version()}, numpy "
            f"{np.__version__}, numba {numba.__version__}, load avg "
            f"{os.getloadavg()[0]:.2f}")


def cases(rng, reps_big):
    import numba

    from dsv4.quant.blocks import q4
    from dsv4.quant.formats import bf16_round
    from dsv4.runtime.kernels import attn, gemv
    from dsv4.runtime.kernels.attn_decode import attend_keys
    from dsv4.runtime.kernels.attn_kv import read_kv_fp8_lut_into
    from dsv4.quant.formats import E4M3_VALUES
    from dsv4.runtime.kv_cache import Fp4KeyStore, Fp8KVStore

    H, D, Rd, Ih, Id = 64, 512, 64, 64, 128
    st = Fp8KVStore(4096, D, Rd)
    st.write(np.arange(4096), bf16_round(rng.standard_normal((4096, D)).astype(np.float32)))
    f32rows = rng.standard_normal((4096, D)).astype(np.float32)
    rows = rng.permutation(4096)[:640]
    out = np.empty((640, D), np.float32)
    kv_bytes = 640 * (D - Rd + 7 + 2 * Rd + 4 * D)          # read codes+exps+rope, write f32
    yield ("read_kv_fp8 640 rows (bit decode)", "kv", kv_bytes, 0,
           lambda: attn.read_kv_fp8(st.codes, st.exps, st.rope, rows, 64, out), 20)
    yield ("read_kv_fp8 640 rows (256-entry LUT)", "kv", kv_bytes, 0,
           lambda: read_kv_fp8_lut_into(st.codes, st.exps, st.rope, rows, 64, E4M3_VALUES, out), 20)
    yield ("read_kv_f32 640 rows (gather, ceiling)", "kv", 640 * 8 * D, 0,
           lambda: attn.read_kv_f32(f32rows, rows, out), 20)

    q = bf16_round(rng.standard_normal((1, H, D)).astype(np.float32))
    kv = attn.aligned_empty((1024, D))                     # as a backend would build it
    kv[:] = bf16_round(rng.standard_normal((1024, D)).astype(np.float32))
    kv16 = np.empty(1024 * D + 32, np.float32)              # 16 bytes off a 64-byte line
    off = (-kv16.ctypes.data % 64) // 4 + 4
    kv16 = kv16[off:off + 1024 * D].reshape(1024, D)
    kv16[:] = kv
    sink = rng.standard_normal(H).astype(np.float32)
    idx640 = rng.permutation(1024)[:640][None, :].copy()
    variant = gemv.kernels().variant               # the host's kernels (the decode step's)
    attend, o1, none = attend_keys(variant), attn.aligned_empty((H, D)), np.empty(0, np.float32)
    for K, ref in ((640, "attn_decode"), (128, "attn_swa")):
        idx = idx640[:, :K].copy()
        yield (f"sparse_attn decode S=1 H=64 D=512 K={K}", ref, 0, 4 * H * K * D,
               lambda idx=idx: attn.sparse_attn(q, kv, idx, sink, D ** -0.5), 20)
        yield (f"attend_keys ({variant}: split over keys) K={K}", ref, 0, 4 * H * K * D,
               lambda K=K: attend(q[0], kv[:K], sink, np.float32(D ** -0.5), numba.get_num_threads(), o1,
                                  none, none, False), 20)
    yield ("sparse_attn decode K=640, kv not 64B-aligned", "attn_decode", 0, 4 * H * 640 * D,
           lambda: attn.sparse_attn(q, kv16, idx640, sink, D ** -0.5), 20)
    S = 128
    qp = bf16_round(rng.standard_normal((S, H, D)).astype(np.float32))
    win = np.arange(S)[:, None] - np.arange(128)[None, ::-1]          # window 128
    comp = np.broadcast_to(512 + np.arange(512), (S, 512))               # 512 compressed
    idxp = np.concatenate([np.where(win >= 0, win, -1), comp], axis=1)
    nvalid = int((idxp >= 0).sum())
    yield (f"sparse_attn prefill S={S} K<=640 (window+512)", "attn_decode", 0,
           4 * H * D * nvalid, lambda: attn.sparse_attn(qp, kv, idxp, sink, D ** -0.5), 3)

    for T, S, reps, ref in ((1024, 1, 20, "index_1k"), (16384, 1, 5, "index_64k"),
                            (262144, 1, reps_big, "index_64k"), (1024, 64, 3, "index_1k")):
        ks = Fp4KeyStore(T, Id)
        ks.write(slice(0, T), q4(rng.standard_normal((T, Id)).astype(np.float32)))
        qi = q4(bf16_round(rng.standard_normal((S, Ih, Id)).astype(np.float32)))
        wt = bf16_round((rng.standard_normal((S, Ih)) * 0.01).astype(np.float32))
        for v in dict.fromkeys(("numba", variant)):
            yield (f"index_scores_fp4 ({v}) S={S} T={T}", ref, T * (Id // 2 + Id // 32),
                   2 * S * Ih * Id * T,
                   lambda qi=qi, wt=wt, ks=ks, T=T, v=v: attn.index_scores_fp4(qi, wt, ks.packed, ks.exps, T,
                                                                              variant=v), reps)
    for T in (1024, 262144):
        sc = bf16_round(rng.standard_normal(T).astype(np.float32))
        yield (f"topk_indices T={T} k=512", "", 4 * T, 0,
               lambda sc=sc: attn.topk_indices(sc, 512), 20)
    scr = bf16_round(rng.standard_normal((512, 128)).astype(np.float32))
    yield ("select_rows S=512 T=128 k=512 ratio 4", "", 4 * scr.size, 0,
           lambda: attn.select_rows(scr, np.arange(512), 4, 512), 20)


def run_kernels(threads, repeats, big_repeats) -> list:
    import numba
    rows = []
    for t in threads:
        numba.set_num_threads(t)
        for name, ref, nbytes, flops, fn, reps in cases(np.random.default_rng(0), big_repeats):
            first, mean, sd, best = timeit(fn, min(reps, repeats))
            rows.append((t, name, ref, nbytes, flops, first, mean, sd, best))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--big-repeats", type=int, default=3, help="repeats of the T=262144 scan")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    if a.child:                 # kernels in their own process: its spinning OpenMP workers
        print(json.dumps(run_kernels(threads, a.repeats, a.big_repeats)))   # end with it
        return
    gemm_before = {t: sgemm_gflops(t, 20) for t in threads}
    child = subprocess.run([sys.executable, __file__, "--child", "--threads", a.threads,
                            "--repeats", str(a.repeats), "--big-repeats", str(a.big_repeats)],
                           capture_output=True, text=True, check=True)
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    gemm_after = {t: sgemm_gflops(t, 20) for t in threads}
    lines = [f"machine: {machine()}", f"command: python {' '.join(sys.argv)}",
             f"env: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} OMP_PROC_BIND="
             f"{os.environ['OMP_PROC_BIND']} OMP_PLACES={os.environ['OMP_PLACES']}", "",
             "numpy sgemm GFLOP/s (same FLOPs as the kernel; before / after the kernels):", ""]
    for t in threads:
        lines.append(f"- {t} thread(s): " + ", ".join(
            f"{k} [{'x'.join(map(str, SHAPES[k]))}] {gemm_before[t][k]:.0f} / "
            f"{gemm_after[t][k]:.0f}" for k in SHAPES))
    lines += ["", "GFLOP/s and GB/s from the mean time; 'vs sgemm' divides by the better of the",
              "two sgemm measurements of the same thread count.", "",
              "| thr | kernel | first call ms | mean ± sd ms | min ms | GFLOP/s | vs sgemm "
              "| GB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for t, name, ref, nbytes, flops, first, mean, sd, best in rows:
        t = int(t)
        gf = flops / mean / 1e9 if flops else 0.0
        base = max(gemm_before[t].get(ref, 0), gemm_after[t].get(ref, 0))
        ratio = f"{gf / base:.2f}" if flops and base else "–"
        lines.append(f"| {t} | {name} | {first * 1e3:.1f} | {mean * 1e3:.3f} ± {sd * 1e3:.3f} | "
                     f"{best * 1e3:.3f} | {f'{gf:.1f}' if flops else '–'} | {ratio} | "
                     f"{f'{nbytes / mean / 1e9:.2f}' if nbytes else '–'} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
