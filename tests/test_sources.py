"""The kernel-source digest that keys Numba's on-disk cache (runtime/kernels/sources.py)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dsv4.runtime.kernels import sources

ROOT = Path(sources.__file__).parent.parent.parent


def _copy_sources(dst: Path) -> list[Path]:
    for path in sources.source_files(ROOT):
        target = dst / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return sources.source_files(dst)


def test_digest_covers_inlined_helpers_and_constants(tmp_path):
    names = {str(p.relative_to(ROOT)) for p in sources.source_files(ROOT)}
    for name in ("runtime/kernels/actq.py", "runtime/kernels/moe_step.py", "runtime/kernels/ir_avx512_int.py",
                 "quant/formats.py", "runtime/config.py"):
        assert name in names
    files = _copy_sources(tmp_path)
    base = sources.digest_of(files, tmp_path)
    assert base == sources.digest() and len(base) == 16
    for name in ("runtime/kernels/actq.py", "quant/formats.py", "runtime/config.py"):
        path = tmp_path / name
        text = path.read_bytes()
        path.write_bytes(text + b"\n# edited\n")
        assert sources.digest_of(files, tmp_path) != base, name
        path.write_bytes(text)
    assert sources.digest_of(files, tmp_path) == base


def test_cache_dir_keeps_the_newest_digest_folders(tmp_path):
    root = tmp_path / "numba"
    root.mkdir()
    old = []
    for i, name in enumerate(["0123456789abcdef", "fedcba9876543210", "00000000000000aa", "00000000000000bb"]):
        d = root / name
        (d / "kernels_x").mkdir(parents=True)
        stamp = time.time() - 1000 * (i + 1)                  # the first is the newest
        os.utime(d, (stamp, stamp))
        old.append(d)
    other = root / "kernels_legacy"                           # not a digest folder: left alone
    other.mkdir()
    here = sources.cache_dir(root, keep=3)
    assert here == root / sources.digest() and here.is_dir()
    assert [d.exists() for d in old] == [True, True, False, False]
    assert other.exists()
    assert sources.cache_dir(root, keep=3) == here            # idempotent
    assert sorted(p.name for p in root.iterdir()) == sorted([here.name, old[0].name, old[1].name, other.name])


def test_cli_puts_the_numba_cache_under_the_digest(tmp_path, monkeypatch):
    from dsv4.cli import main
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("DSV4_HOME", str(tmp_path))
    main._numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "numba" / sources.digest())
    assert (tmp_path / "numba" / sources.digest()).is_dir()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))    # the user's choice wins
    main._numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")


def test_compiled_closures_capture_only_plain_constants():
    """Numba keys a cached closure on its captured values, pickled; a captured dispatcher
    pickles differently in every process, so such a closure would compile anew in each one
    (it cost every CLI launch ~25 s once). The per-variant closures capture strings only."""
    from dsv4.runtime.kernels import attn_decode, attn_index, attn_step, decode_layer, gemv
    factories = [attn_decode.attend_keys, attn_decode._parts, attn_index.index_scores_for,
                 attn_step.attend_one_for]
    made = [f(v) for f in factories for v in ("avx512", "avx2", "numba")]
    made += [decode_layer.layer_step(v) for v in ("avx512", "avx2")] + [gemv._driver(v) for v in ("avx512", "avx2")]
    for disp in made:
        cells = disp.py_func.__closure__ or ()
        kinds = {type(c.cell_contents) for c in cells}
        assert kinds <= {str, int, float, bool, tuple}, (disp.py_func.__qualname__, kinds)
