"""`dsv4 bench`: llama-bench style pp/tg table with ceilings measured in the same run."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import click

from dsv4.runtime.threads import THREADING

from .common import (configure_threads, model_option, note_first_compile,
                     load_model, numerics_from, pages_line, weight_pages, weights_options)


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint=name) from None
    if not vals or min(vals) < 0:
        raise click.BadParameter(f"expected non-negative integers, got {text!r}", param_hint=name)
    return vals


def machine_description() -> dict:
    import llvmlite  # noqa: PLC0415
    import numba  # noqa: PLC0415
    import numpy  # noqa: PLC0415
    import psutil  # noqa: PLC0415
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from llvmlite import binding as llvm  # noqa: PLC0415
    feats = llvm.get_host_cpu_features()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avx512bf16",
                        "amx-bf16") if feats.get(f)]
    return {"cpu": model, "cores": psutil.cpu_count(logical=False),
            "logical_cpus": psutil.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "simd": simd, "python": platform.python_version(), "numpy": numpy.__version__,
            "numba": numba.__version__, "llvmlite": llvmlite.__version__}


def weights_memory(ckpt, probe, sample: int = 1 << 30) -> tuple[float, float] | None:
    """(GB/s reading a sample of the weights where they sit, GB/s reading the probe's fresh
    buffer), with the current thread count; None for a checkpoint too small to sample
    beyond the caches (under half of `sample`)."""
    from dsv4.runtime.kernels.membw import read_bandwidth, sample_words  # noqa: PLC0415
    words = sample_words(ckpt.buffers(), sample)
    if sum(w.nbytes for w in words) < sample // 2:
        return None
    return read_bandwidth(words), probe.measure()


def memory_line(weights: float, fresh: float, in_memory: bool, hint: bool = True) -> str:
    """The weights' memory against fresh memory, with a hint when it is much slower."""
    where = "the weights (read into memory)" if in_memory else "the weights (mapped)"
    line = f"memory read: {where} {weights:.1f} GB/s, a fresh buffer {fresh:.1f} GB/s ({100 * weights / fresh:.0f}%)"
    if hint and not in_memory and weights < 0.9 * fresh:
        line += ("; the page cache holding the weights streams slower than this process's own "
                 "memory here, and decode with it: --no-mmap reads them into process memory")
    return line


def prefault_weights(ckpt) -> None:
    """Fault in every weight page before timing, with a progress bar on a terminal."""
    total = ckpt.total_bytes()
    click.echo(f"faulting in {total / 1e9:.2f} GB of weights...", err=True)
    from tqdm import tqdm  # noqa: PLC0415
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        ckpt.prefault(progress=lambda done, _total: bar.update(done - bar.n))


@click.command()
@model_option
@click.option("-p", "prompts", default="512", show_default=True,
              help="Prompt lengths to time (comma-separated); 0 skips pp.")
@click.option("-n", "gens", default="128", show_default=True,
              help="Generation lengths to time (comma-separated); 0 skips tg.")
@click.option("-r", "repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repetitions per test (mean ± sd).")
@click.option("-t", "threads", default=None, help="Thread counts to sweep (comma-separated; "
              "default: all available cores).")
@click.option("--depth", "depths", default="0", show_default=True,
              help="Context depths to run the tests at (comma-separated), e.g. 0,4096,32768.")
@click.option("--backend", type=click.Choice(["fast", "ref"]), default="fast", show_default=True)
@click.option("--threading", type=click.Choice(THREADING), default="omp",
              show_default=True,
              help="Thread pool (see `dsv4 generate --help`); omp-spin favours tg over pp.")
@click.option("--exact", is_flag=True, help="Exact-math mode (no rounding steps).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--record", type=click.Path(dir_okay=False), default=None,
              help="Also write a markdown record (machine, command, table) to this file.")
@weights_options
def bench(model, prompts, gens, repeats, threads, depths, backend, threading, exact, as_json,
          record, reload_pages, no_mmap):
    """Measure prompt processing (pp) and generation (tg) speed.

    tg rows report bytes read per decoded token (weights actually touched plus KV), the
    effective GB/s and its ratio to the read bandwidth measured with the same thread count;
    pp rows report matmul FLOPs per token and the ratio to numpy's float32 GEMM rate. The
    ceiling is measured before every repeat and after the last; each repeat is divided by
    the two measurements around it, and the ratio column is the mean ± sd of those. Pages
    are faulted in first; JIT time apart.
    """
    import numba  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dsv4.runtime.benchmark import fill_context, format_repeats, format_table, pp_row, tg_row  # noqa: PLC0415
    from dsv4.runtime.model_store import resolve_model  # noqa: PLC0415
    from dsv4.runtime.threads import available_cores, set_threads  # noqa: PLC0415

    pp, tg, ds = _ints(prompts, "-p"), _ints(gens, "-n"), _ints(depths, "--depth")
    ts = _ints(threads, "-t") if threads else [available_cores()]
    if min(ts) < 1:
        raise click.BadParameter("thread counts must be >= 1", param_hint="-t")
    configure_threads(max(ts), threading)
    folder = resolve_model(model)
    note_first_compile(backend)
    t0 = time.perf_counter()
    m = load_model(folder, numerics_from(exact, "current"), backend, reload_pages, no_mmap)
    prefault_weights(m.ckpt)
    pages = weight_pages(m.ckpt)
    if pages is not None:
        click.echo(pages_line(pages), err=True)
    from dsv4.runtime.kernels.membw import BandwidthProbe  # noqa: PLC0415
    probe = BandwidthProbe()
    memory = weights_memory(m.ckpt, probe)
    if memory is not None:
        click.echo(memory_line(*memory, m.ckpt.in_memory), err=True)
    t1 = time.perf_counter()
    warm = m.new_cache(16)
    m.forward(np.arange(1, 9), warm)
    m.forward([5], warm)
    jit_s = time.perf_counter() - t1
    click.echo(f"load {t1 - t0:.2f} s, first calls (JIT) {jit_s:.2f} s", err=True)
    rng = np.random.default_rng(0)
    rows = []
    set_threads(max(ts))
    bases = {}
    for d in ds:                                   # each context depth is filled once
        if d:
            click.echo(f"filling a context of {d} tokens...", err=True)
        bases[d] = fill_context(m, d, d + max(pp + tg) + 1, rng)
    for t in ts:
        set_threads(t)
        for d in ds:
            base = bases[d]
            for n in (x for x in pp if x):
                rows.append(pp_row(m, base, n, repeats, numba.get_num_threads(), rng))
                click.echo(format_table(rows[-1:], jit_s).splitlines()[2], err=True)
            for n in (x for x in tg if x):
                rows.append(tg_row(m, base, n, repeats, numba.get_num_threads(), probe, m.ckpt))
                click.echo(format_table(rows[-1:], jit_s).splitlines()[2], err=True)
    table = format_table(rows, jit_s) + "\n\n" + format_repeats(rows)
    if as_json:
        click.echo(json.dumps({"machine": machine_description(), "jit_s": jit_s,
                               "weight_pages": None if pages is None else
                               {"resident_bytes": pages.resident, "huge_bytes": pages.huge},
                               "weights_in_memory": m.ckpt.in_memory,
                               "read_gbs": None if memory is None else
                               {"weights": memory[0], "fresh": memory[1]},
                               "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        click.echo(table)
    if record:
        cmd = "dsv4 " + " ".join(sys.argv[1:])
        mach = machine_description()
        with open(record, "w") as f:
            f.write(f"# dsv4 bench\n\ncommand: `{cmd}`\n\nmachine: `{json.dumps(mach)}`\n\n")
            f.write(f"model: {folder} ({m.ckpt.total_bytes() / 1e9:.2f} GB), backend {backend}, "
                    f"threading {os.environ.get('NUMBA_THREADING_LAYER')}"
                    f"{' (spinning)' if os.environ.get('OMP_WAIT_POLICY') == 'active' else ''}, "
                    f"{m.num.describe()}"
                    f"{'' if pages is None else '; ' + pages_line(pages, hint=False)}"
                    f"{'' if memory is None else '; ' + memory_line(*memory, m.ckpt.in_memory, hint=False)}"
                    f"\n\n```\n{table}\n```\n")
