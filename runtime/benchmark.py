"""`dsv4 bench`: prompt processing (pp) and token generation (tg) speed, as ratios to ceilings
measured in the same run — memory read bandwidth for tg, numpy's float32 GEMM rate for pp.

Per row: tokens/s mean and sd over repeats; for tg the bytes one decode step reads (weights
actually touched plus KV) and the effective GB/s; for pp the matmul FLOPs per token and the
effective GFLOP/s. The ceiling is measured before every repeat and after the last one, and
each repeat's rate is divided by the mean of the two measurements around it: on a shared
machine the ceiling can move by half within a row, so pairing each repeat with its own
neighbourhood gives a truer ratio than the row's endpoints. The ratio is the mean (± sd)
of those per-repeat ratios. Pages are faulted in before timing; JIT time is reported apart.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .config import ModelConfig
from .footprint import bytes_per_token
from .kv_plan import entry_bytes, key_bytes
from .model import Model
from .tensor_spec import all_specs


@dataclass
class BenchRow:
    test: str                 # "pp512" / "tg128"
    depth: int
    threads: int
    tps_mean: float
    tps_sd: float
    work_per_token: float     # bytes (tg) or FLOPs (pp)
    rate: float               # GB/s (tg) or GFLOP/s (pp) achieved
    ceiling: float            # GB/s read bandwidth (tg) or numpy sgemm GFLOP/s (pp), first
    ceiling_after: float      # ... and last measurement
    ratio: float              # mean over repeats of rate / ceiling around the repeat
    ttft_s: float | None = None
    ratio_sd: float = 0.0
    ceilings: list[float] = field(default_factory=list)   # before each repeat, after the last
    tps: list[float] = field(default_factory=list)        # tokens/s of each repeat

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_flops_per_token(cfg: ModelConfig, keys_per_layer: list[float],
                           index_keys_per_layer: list[float], head: bool = True) -> float:
    """FLOPs of every matmul one token costs: linears (k of E experts), router, compressor,
    indexer and hyper-connection projections, the head (unless `head` is False: a prefill
    chunk computes logits for its last position only), plus attention scores/values and
    indexer scoring for the given key counts."""
    k_over_e = cfg.n_activated_experts / cfg.n_routed_experts
    total = 0.0
    for spec in all_specs(cfg, include_mtp=False):
        if spec.name == "embed.weight" or spec.kind not in ("linear", "expert", "dense", "f32"):
            continue
        if spec.name == "head.weight" and not head:
            continue
        if spec.kind == "f32" and not spec.name.endswith("_fn"):
            continue
        flops = 2.0 * float(np.prod(spec.shape))
        total += flops * (k_over_e if spec.kind == "expert" else 1.0)
    for layer in range(cfg.n_layers):
        total += 4.0 * cfg.n_heads * cfg.head_dim * keys_per_layer[layer]
        total += 2.0 * cfg.index_n_heads * cfg.index_head_dim * index_keys_per_layer[layer]
    return total


def attention_keys(cfg: ModelConfig, pos: int) -> tuple[list[float], list[float]]:
    """Keys attended and indexer keys scanned per layer by a query at position `pos`."""
    keys, scanned = [], []
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        n = min(pos + 1, cfg.window)
        t = (pos + 1) // m if m else 0
        if m == 4:
            n += min(cfg.index_topk, t)
        elif m:
            n += t
        keys.append(n)
        scanned.append(t if m == 4 else 0)
    return keys, scanned


def kv_bytes_read(cfg: ModelConfig, pos: int, storage: str) -> float:
    keys, scanned = attention_keys(cfg, pos)
    e = entry_bytes(cfg.head_dim, cfg.rope_dim, storage)
    k = key_bytes(cfg.index_head_dim, storage)
    return sum(n * e for n in keys) + sum(t * k for t in scanned)


def sgemm_gflops(m: int = 512, k: int = 4096, n: int = 2048, repeats: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def _stats(xs: list[float]) -> tuple[float, float]:
    arr = np.asarray(xs, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fill_context(model: Model, depth: int, capacity: int, rng, chunk: int = 512):
    cache = model.new_cache(capacity)
    ids = rng.integers(0, model.cfg.vocab_size, depth)
    for s in range(0, depth, chunk):
        model.forward(ids[s:s + chunk], cache, last_only=True)
    return cache


def time_pp(model: Model, base, n: int, rng) -> float:
    """Seconds to prefill n random tokens after the context in `base` (a clone of it)."""
    cache = base.clone()
    ids = rng.integers(0, model.cfg.vocab_size, n)
    t = time.perf_counter()
    logits = model.forward(ids, cache, last_only=True)
    int(np.argmax(logits[-1]))
    return time.perf_counter() - t


def time_tg(model: Model, base, n: int) -> float:
    """Seconds to greedy-decode n tokens after the context in `base` (a clone of it)."""
    cache = base.clone()
    tok = 1 + cache.pos % (model.cfg.vocab_size - 1)
    t = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(model.forward([tok], cache, last_only=True)[-1]))
    return time.perf_counter() - t


def paired_ratios(rates: list[float], ceilings: list[float]) -> list[float]:
    """rates[i] / the mean of ceilings[i] and ceilings[i + 1] (measured right before and
    right after repeat i)."""
    if len(ceilings) != len(rates) + 1:
        raise ValueError("one ceiling before each repeat and one after the last are needed")
    return [r / ((ceilings[i] + ceilings[i + 1]) / 2) for i, r in enumerate(rates)]


def _row(test: str, base, threads: int, n: int, times: list[float], work: float, ceilings: list[float],
         ttft: float | None = None) -> BenchRow:
    """A row from per-repeat times (n tokens each), work per token and the ceilings."""
    tps = [n / t for t in times]
    mean, sd = _stats(tps)
    rmean, rsd = _stats(paired_ratios([work * x / 1e9 for x in tps], ceilings))
    return BenchRow(test, base.pos, threads, mean, sd, work, work * mean / 1e9, ceilings[0], ceilings[-1],
                    rmean, ttft_s=ttft, ratio_sd=rsd, ceilings=list(ceilings), tps=tps)


def tg_row(model: Model, base, n: int, repeats: int, threads: int, probe, ckpt) -> BenchRow:
    cfg = model.cfg
    bws, times = [probe.measure()], []
    for _ in range(repeats):
        times.append(time_tg(model, base, n))
        bws.append(probe.measure())
    weights = sum(bytes_per_token(cfg, ckpt).values())
    kv = np.mean([kv_bytes_read(cfg, base.pos + i, model.num.kv_storage) for i in range(n)])
    return _row(f"tg{n}", base, threads, n, times, weights + kv, bws)


def pp_row(model: Model, base, n: int, repeats: int, threads: int, rng) -> BenchRow:
    cfg = model.cfg
    gs, times = [sgemm_gflops()], []
    for _ in range(repeats):
        times.append(time_pp(model, base, n, rng))
        gs.append(sgemm_gflops())
    head = 2.0 * cfg.vocab_size * cfg.dim                      # logits of the last position
    flops = np.mean([matmul_flops_per_token(cfg, *attention_keys(cfg, base.pos + i), head=False)
                     for i in range(0, n, max(1, n // 16))]) + head / n
    return _row(f"pp{n}", base, threads, n, times, flops, gs, ttft=min(times))


def format_table(rows: list[BenchRow], jit_s: float) -> str:
    head = (f"{'test':>8} {'depth':>6} {'thr':>3} {'tok/s':>16} {'per token':>11} "
            f"{'achieved':>12} {'ceiling':>17} {'ratio':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tg = r.test.startswith("tg")
        per = f"{r.work_per_token / 1e9:.3f} {'GB' if tg else 'GF'}"
        unit = "GB/s" if tg else "GF/s"
        lines.append(f"{r.test:>8} {r.depth:>6} {r.threads:>3} "
                     f"{r.tps_mean:>8.2f} ± {r.tps_sd:<5.2f} {per:>11} "
                     f"{r.rate:>7.2f} {unit} {r.ceiling:>6.1f}/{r.ceiling_after:<5.1f}{unit} "
                     f"{100 * r.ratio:>5.1f}% ± {100 * r.ratio_sd:<4.1f}")
    lines.append(f"JIT / kernel compile and first call: {jit_s:.2f} s (ceilings: tg = read bandwidth, "
                 "pp = numpy sgemm, measured before each repeat and after the last, first/last shown; "
                 "ratio: mean ± sd over repeats of the repeat's rate / the ceilings around it)")
    return "\n".join(lines)


def format_repeats(rows: list[BenchRow]) -> str:
    """Each repeat of each row: tokens/s, the rate, the mean of the two ceilings measured
    around it and their ratio (the numbers behind the table's mean ± sd; on a shared machine
    they show which repeats ran in a fast and which in a slow phase)."""
    lines = ["per repeat: tok/s, achieved / ceiling around it = ratio"]
    for r in rows:
        tg = r.test.startswith("tg")
        unit = "GB/s" if tg else "GF/s"
        rates = [r.work_per_token * x / 1e9 for x in r.tps]
        parts = [f"{x:.2f} tok/s {rate:.1f} / {(r.ceilings[i] + r.ceilings[i + 1]) / 2:.1f} {unit} = {100 * q:.1f}%"
                 for i, (x, rate, q) in enumerate(zip(r.tps, rates, paired_ratios(rates, r.ceilings)))]
        lines.append(f"{r.test:>8} {r.depth:>6} {r.threads:>3}  " + " | ".join(parts))
    return "\n".join(lines)
