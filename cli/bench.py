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
                     numerics_from, pages_line, prepare_pages, reload_pages_option)


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
@reload_pages_option
def bench(model, prompts, gens, repeats, threads, depths, backend, threading, exact, as_json,
          record, reload_pages):
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
    from dsv4.runtime.model import Model  # noqa: PLC0415
    from dsv4.runtime.model_store import resolve_model  # noqa: PLC0415
    from dsv4.runtime.pages import mapped_pages  # noqa: PLC0415
    from dsv4.runtime.threads import available_cores, set_threads  # noqa: PLC0415

    pp, tg, ds = _ints(prompts, "-p"), _ints(gens, "-n"), _ints(depths, "--depth")
    ts = _ints(threads, "-t") if threads else [available_cores()]
    if min(ts) < 1:
        raise click.BadParameter("thread counts must be >= 1", param_hint="-t")
    configure_threads(max(ts), threading)
    folder = resolve_model(model)
    note_first_compile(backend)
    prepare_pages(folder, reload_pages)
    t0 = time.perf_counter()
    m = Model.load(folder, numerics_from(exact, "current"), backend=backend)
    prefault_weights(m.ckpt)
    pages = mapped_pages(m.ckpt.files())
    if pages is not None:
        click.echo(pages_line(pages), err=True)
    from dsv4.runtime.kernels.membw import BandwidthProbe  # noqa: PLC0415
    probe = BandwidthProbe()
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
                    f"\n\n```\n{table}\n```\n")
