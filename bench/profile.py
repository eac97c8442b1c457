"""Where a decode step's (or a prefill chunk's) CPU time goes, by function, with `perf`
sampling this process.

Numba and llvmlite code has no symbols perf can see. After the timed tokens this script
writes /tmp/perf-<pid>.map (the format perf reads for JIT code) with the address of every
function the loaded code libraries define, then prints perf's report: the IR kernels
(dsv4_<isa>_<format>), the compiled stages and parallel regions, libgomp's waiting,
Python. Needs `perf` (cpu-clock sampling works in most VMs; perf_event_paranoid <= 2).

    python bench/profile.py -m /tmp/bench/flash16 -n 32 -t 2 [--no-mmap] [--depth 4096]
    python bench/profile.py -m /tmp/bench/flash16 --prefill 512 -n 3 -t 2
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def jit_symbols() -> dict[int, str]:
    """Start address -> name of every function defined by the loaded Numba code libraries."""
    from numba.core.codegen import JITCodeLibrary
    out = {}
    for lib in (o for o in gc.get_objects() if isinstance(o, JITCodeLibrary)):
        engine = lib._codegen._engine._ee
        for mod in (getattr(lib, "_final_module", None), getattr(lib, "_shared_module", None)):
            for fn in (() if mod is None else mod.functions):
                if not fn.is_declaration:
                    addr = engine.get_function_address(fn.name)
                    if addr:
                        out[addr] = fn.name
    return out


def write_perf_map(symbols: dict[int, str], pid: int) -> Path:
    """/tmp/perf-<pid>.map; each function runs up to the next one's start (at most 1 MB)."""
    path = Path(tempfile.gettempdir()) / f"perf-{pid}.map"
    starts = sorted(symbols)
    with open(path, "w") as f:
        for a, b in zip(starts, starts[1:] + [starts[-1] + 4096]):
            f.write(f"{a:x} {min(b - a, 1 << 20):x} {symbols[a]}\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-n", type=int, default=32, help="decoded tokens to sample (with --prefill: prefill passes)")
    ap.add_argument("--prefill", type=int, default=0, metavar="P",
                    help="sample prefills of P tokens (each into a fresh cache after --depth tokens) instead of decode")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--depth", type=int, default=0, help="context tokens before decoding")
    ap.add_argument("--no-mmap", action="store_true", help="weights read into process memory")
    ap.add_argument("--freq", type=int, default=4000, help="samples per second per thread")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("profile.py needs the `perf` tool")
    from dsv4.cli.common import configure_threads
    from dsv4.runtime.threads import set_threads
    n_threads = configure_threads(args.threads)
    import numpy as np

    from dsv4.runtime.model import Model
    from dsv4.runtime.numerics import Numerics
    m = Model.load(Path(args.model), Numerics.from_revision("current", exact=False), backend="fast",
                   in_memory=args.no_mmap)
    m.ckpt.prefault()
    set_threads(n_threads)                                      # Numba is imported now: limit its pool
    ids = np.random.default_rng(0).integers(0, m.cfg.vocab_size, args.depth + max(args.prefill, 8))

    def context():                                              # a cache holding --depth tokens
        cache = m.new_cache(args.depth + max(args.prefill, args.n) + 16)
        for s in range(0, args.depth, 512):
            m.forward(ids[s:min(s + 512, args.depth)], cache, last_only=True)
        return cache
    if args.prefill:
        caches = [context() for _ in range(args.n + 1)]
        m.forward(ids[args.depth:], caches.pop(), last_only=True)   # warm: compiled, plans built

        def step():
            m.forward(ids[args.depth:], caches.pop(), last_only=True)
        unit = f"prefills of {args.prefill} tokens"
    else:
        cache = context()
        tok = 1
        for _ in range(3):                                      # warm: compiled, plans built
            tok = int(np.argmax(m.forward([tok], cache, last_only=True)[-1]))

        def step():
            nonlocal tok
            tok = int(np.argmax(m.forward([tok], cache, last_only=True)[-1]))
        unit = "tokens"
    data = Path(tempfile.mkdtemp()) / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(args.freq), "-p", str(os.getpid()),
                            "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)                                             # perf attached
    t = time.perf_counter()
    for _ in range(args.n):
        step()
    dt = time.perf_counter() - t
    rec.send_signal(signal.SIGINT)
    rec.wait()
    mapfile = write_perf_map(jit_symbols(), os.getpid())
    print(f"{args.n} {unit}, {1e3 * dt / args.n:.1f} ms each ({args.n / dt:.2f} per s); "
          f"samples include the 0.5 s before the first one")
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                          "--sort", "sym"], capture_output=True, text=True).stdout
    lines = [ln for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")]
    for ln in lines[:args.top]:
        pct, _, sym = ln.split(None, 2)
        print(f"{pct:>8}  {sym[:140]}")
    mapfile.unlink()
    shutil.rmtree(data.parent)


if __name__ == "__main__":
    main()
