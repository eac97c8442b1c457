"""Options and helpers shared by the verbs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dsv4.runtime.errors import DsvError
from dsv4.runtime.numerics import Numerics
from dsv4.runtime.threads import THREADING


def model_option(f):
    return click.option("--model", "-m", "model", required=True, metavar="DIR|PRESET",
                        help="Checkpoint folder (official HF layout), or a preset name "
                             "(tiny, small) whose random-weight checkpoint is made once and "
                             "cached under $DSV4_HOME or ~/.cache/dsv4.")(f)


def runtime_options(f):
    opts = [
        click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
                     help="Worker threads (default: all available cores)."),
        click.option("--threading", type=click.Choice(THREADING), default="omp", show_default=True,
                     help="Thread pool: omp suits mixed prefill and decode; omp-spin keeps "
                          "workers spinning (decode up to ~10% faster in some runs, prefill "
                          "about half as fast); tbb needs `pip install tbb`."),
        click.option("--backend", type=click.Choice(["fast", "ref"]), default="fast",
                     show_default=True,
                     help="fast: Numba/llvmlite kernels; ref: the plain NumPy reference."),
        click.option("--exact", is_flag=True,
                     help="Exact-math mode: no FP8/FP4/bf16 rounding steps, float32 caches "
                          "(for comparing implementations)."),
        click.option("--revision", type=click.Choice(["current", "initial"]), default="current",
                     show_default=True,
                     help="Official numerics revision: 'initial' = no FP8 rounding of cached "
                          "KV and no clamp on the shared expert."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def weights_options(f):
    """--reload-pages and --no-mmap: where the weights sit in memory."""
    f = click.option(
        "--no-mmap", "no_mmap", is_flag=True,
        help="Read the weights into this process's own memory instead of mapping the files: "
             "every launch then reads the whole checkpoint (slower start, no sharing with other "
             "processes), but on machines where the page cache sits in slower memory decode "
             "streams faster (`dsv4 bench` compares the two memories).")(f)
    return click.option(
        "--reload-pages", is_flag=True,
        help="Drop all of the checkpoint's files from the page cache first, so they are read "
             "back from disk on 2 MB pages where the kernel allows. Without it, only the parts "
             "cached in small pages are read back (decode on small pages can be several times "
             "slower on some machines; see the 'on 2 MB pages' line).")(f)


def load_model(folder: Path, numerics: Numerics, backend: str, reload_pages: bool, no_mmap: bool,
               warm: bool = False):
    """Model.load after the page work: prepare_pages for mapped weights; with --no-mmap the
    shards are read into memory, with a progress bar on a terminal."""
    from dsv4.runtime.model import Model  # noqa: PLC0415
    if no_mmap and reload_pages:
        raise DsvError("--reload-pages concerns mapped weights; --no-mmap reads them into memory")
    if not no_mmap:
        prepare_pages(folder, reload_pages)
        return Model.load(folder, numerics, backend=backend, warm=warm)
    from tqdm import tqdm  # noqa: PLC0415
    with tqdm(unit="B", unit_scale=True, desc="reading weights", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        return Model.load(folder, numerics, backend=backend, in_memory=True, progress=progress)


def weight_pages(ckpt):
    """MappedPages of the checkpoint's weights: its file mappings, or its in-memory copies."""
    from dsv4.runtime.pages import mapped_pages, memory_pages  # noqa: PLC0415
    return memory_pages(ckpt.buffers()) if ckpt.in_memory else mapped_pages(ckpt.files())


def prepare_pages(folder: Path, reload: bool) -> None:
    """Before loading: with --reload-pages drop all of the checkpoint from the page cache;
    otherwise read back only the 2 MB chunks it holds in small pages (pages.settle_huge),
    which no mapping could put on 2 MB pages."""
    from dsv4.runtime.pages import evict, settle_huge  # noqa: PLC0415
    from dsv4.runtime.weights import shard_paths  # noqa: PLC0415
    files = shard_paths(folder)               # Model.load parses the headers afterwards
    if reload:
        click.echo("dropping the weights from the page cache (they are read back from disk)...", err=True)
        evict(files)
        return
    dropped = settle_huge(files)
    if dropped >= 256 << 20:                     # worth a word (a tiny model's few MB are not)
        click.echo(f"dsv4: {dropped / 1e9:.2f} GB of the weights sat in the page cache in small pages; "
                   "read them back from disk on 2 MB pages", err=True)


def pages_line(pages, hint: bool = True) -> str:
    """How much of the weights is resident, and on 2 MB pages (with a hint when few are)."""
    line = (f"weights resident: {pages.resident / 1e9:.2f} GB, {pages.huge / 1e9:.2f} GB of them "
            f"on 2 MB pages ({100 * pages.share:.0f}%)")
    if hint and many_small_pages(pages):
        line += ("; small pages can make decode several times slower (the file system may "
                 "not hold 2 MB folios, memory may be fragmented, or another process maps the "
                 "files); --reload-pages reads all of them back from disk")
    return line


def many_small_pages(pages) -> bool:
    """Less than 90% of the resident weights on 2 MB pages, for a checkpoint of at least
    256 MB (a tiny one fits in a few 2 MB pages, partly its files' unaligned ends)."""
    return pages.share < 0.9 and pages.resident >= 256 << 20


def numerics_from(exact: bool, revision: str) -> Numerics:
    return Numerics.from_revision(revision, exact=exact)


def configure_threads(threads: int | None, mode: str = "omp") -> int:
    """Set the threading layer (before Numba starts) and the BLAS / Numba pool sizes."""
    from dsv4.runtime.threads import available_cores, set_threads, threading_env  # noqa: PLC0415
    n = min(threads or available_cores(), available_cores())
    for k, v in threading_env(mode).items():
        os.environ.setdefault(k, v)
    # Numba re-reads its configuration whenever it compiles; without this variable the pool
    # size defaults to the main thread's CPU affinity, which the pinned OpenMP pool narrows,
    # and a compile after the pool started would then fail.
    os.environ.setdefault("NUMBA_NUM_THREADS", str(available_cores()))
    return set_threads(n)


def note_first_compile(backend: str) -> None:
    """Tell the user why the very first run is slow (kernels compile once, then load)."""
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if backend == "fast" and cache and not any(os.scandir(cache) if os.path.isdir(cache) else ()):
        click.echo(f"dsv4: first run: compiling the SIMD kernels (once, a few minutes; "
                   f"cached in {cache})", err=True)


def generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, if any."""
    path = model_dir / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    if isinstance(data.get("temperature"), (int, float)):
        out["temperature"] = float(data["temperature"])
    if isinstance(data.get("top_p"), (int, float)):
        out["top_p"] = float(data["top_p"])
    if isinstance(data.get("top_k"), int):
        out["top_k"] = data["top_k"]
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
