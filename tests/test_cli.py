"""The `dsv4` command in a subprocess: smoke tests and bad input (one line, non-zero exit)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_pages import can_drop_pages

from dsv4.runtime import pages
from dsv4.runtime.st_writer import write_safetensors
from dsv4.runtime.weights import Checkpoint


def dsv4(*args, stdin=None, env=None, timeout=300):
    e = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsv4.cli.main", *args], input=stdin,
                          capture_output=True, text=True, env=e, timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsv4: error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def make(name="bad"):
        dst = tmp_path / name
        shutil.copytree(tiny_dir, dst)
        return dst
    return make


def test_make_model_info_generate(tmp_path):
    folder = tmp_path / "m"
    r = dsv4("make-model", str(folder), "--preset", "tiny", "--layers", "3", "--experts", "4",
             "--shard-size", "1")
    assert r.returncode == 0, r.stderr
    assert "3 layers, 4 experts" in r.stdout
    shards = list(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    if can_drop_pages(folder) and pages.cached_share(shards[0]) is not None:
        # dropped from the page cache after writing, so the first load maps 2 MB pages
        assert max(pages.cached_share(p) for p in shards) < 0.1
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and len(cfg["compress_ratios"]) == 4
    r = dsv4("info", "-m", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["layers"] == {"SWA": 1, "CSA": 1, "HCA": 1, "hash": 2, "mtp": 1}
    assert set(rep["bytes_by_dtype"]) == {"BF16", "F32", "F8_E4M3", "F8_E8M0", "I8", "I64"}
    r = dsv4("generate", "-m", str(folder), "-p", "Hello", "-n", "8", "--seed", "1",
             "--temperature", "0.8", "--backend", "ref")
    assert r.returncode == 0, r.stderr
    assert "prompt:" in r.stderr and "tok/s" in r.stderr
    again = dsv4("generate", "-m", str(folder), "-p", "Hello", "-n", "8", "--seed", "1",
                 "--temperature", "0.8", "--backend", "ref")
    assert again.stdout == r.stdout


def test_info_of_a_preset():
    r = dsv4("info", "--preset", "flash")
    assert r.returncode == 0 and "11.217 GB" in r.stdout and "43 layers" in r.stdout


def test_generate_from_stdin(tiny_dir):
    r = dsv4("generate", "-m", str(tiny_dir), "-n", "4", "--greedy", "-q", stdin="Some text")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


@pytest.mark.parametrize("args,needles", [
    (["generate", "-m", "/no/such/folder", "-p", "x"], ["/no/such/folder", "not a preset"]),
    (["make-model", "{tmp}/x", "--preset", "tiny", "--layers", "0"], ["--layers"]),
])
def test_simple_errors(args, needles, tmp_path):
    r = dsv4(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    if "make-model" in args:   # click validates the range: usage error, exit 2
        assert r.returncode == 2 and "Traceback" not in r.stderr
    else:
        one_line_error(r, *needles)


def test_invalid_flags_are_usage_errors(tiny_dir):
    for flag in (["--temperature", "-1"], ["--top-p", "2"], ["--max-tokens", "x"],
                 ["--backend", "gpu"]):
        r = dsv4("generate", "-m", str(tiny_dir), "-p", "x", *flag)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (flag, r.stderr)
    r = dsv4("make-model", "/tmp/x", "--preset", "huge")
    assert r.returncode == 2 and "huge" in r.stderr


def test_prompt_longer_than_context(tiny_dir):
    one_line_error(dsv4("generate", "-m", str(tiny_dir), "-p", "many words " * 20, "--ctx", "5"),
                   "more than --ctx 5")


def test_config_errors(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(dsv4("generate", "-m", str(folder), "-p", "x"), "hidden_size", "config.json")
    cfg["hidden_size"] = 256
    cfg["compress_ratios"] = cfg["compress_ratios"][:-2]
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(dsv4("generate", "-m", str(folder), "-p", "x"), "compress_ratios")
    (folder / "config.json").write_text("{not json")
    one_line_error(dsv4("info", "-m", str(folder)), "not valid JSON")


def _rewrite_shard(folder, change):
    """Rewrite the shard holding layers.1.attn.wkv.weight with `change(tensors)` applied."""
    ck = Checkpoint(folder)
    name = "layers.1.attn.wkv.weight"
    shard = ck.info(name).file
    tensors = {n: (ck.info(n).dtype, ck.tensor(n).copy()) for n in ck.names()
               if ck.info(n).file == shard}
    change(tensors, name)
    del ck
    write_safetensors(shard, tensors)


def test_tensor_missing_wrong_shape_wrong_dtype(copy_of):
    f1 = copy_of("missing")
    index = json.loads((f1 / "model.safetensors.index.json").read_text())
    _rewrite_shard(f1, lambda t, n: t.pop(n))
    del index["weight_map"]["layers.1.attn.wkv.weight"]
    (f1 / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(dsv4("generate", "-m", str(f1), "-p", "x"), "layers.1.attn.wkv.weight",
                   "missing")
    f2 = copy_of("shape")
    _rewrite_shard(f2, lambda t, n: t.__setitem__(n, (t[n][0], t[n][1][:64].copy())))
    one_line_error(dsv4("generate", "-m", str(f2), "-p", "x"), "layers.1.attn.wkv.weight",
                   "shape")
    f3 = copy_of("dtype")
    _rewrite_shard(f3, lambda t, n: t.__setitem__(n, ("I8", t[n][1].view("int8"))))
    one_line_error(dsv4("generate", "-m", str(f3), "-p", "x"), "dtype I8")


def test_truncated_and_corrupt_shards(copy_of):
    f1 = copy_of("trunc")
    shard = sorted(f1.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    one_line_error(dsv4("generate", "-m", str(f1), "-p", "x"), shard.name)
    f2 = copy_of("corrupt")
    shard = sorted(f2.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#garbage####"
    shard.write_bytes(bytes(data))
    one_line_error(dsv4("generate", "-m", str(f2), "-p", "x"), shard.name)


def test_debug_shows_traceback():
    r = dsv4("--debug", "generate", "-m", "/no/such/folder", "-p", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_thread_settings_survive_compiles_after_the_pool_starts():
    """A kernel compiled after the pinned OpenMP pool started must not fail: Numba re-reads
    its configuration on every compile and would otherwise take the pool size from the main
    thread's (narrowed) CPU affinity. Compiles a fresh function after a parallel region."""
    code = (
        "import os\n"
        "from dsv4.cli.common import configure_threads\n"
        "configure_threads(None, 'omp')\n"
        "import numba, numpy as np\n"
        "@numba.njit(parallel=True)\n"
        "def par(a):\n"
        "    s = 0.0\n"
        "    for i in numba.prange(a.size):\n"
        "        s += a[i]\n"
        "    return s\n"
        "par(np.ones(1000))\n"
        "@numba.njit\n"
        "def later(x):\n"
        "    return x + 1\n"
        "later(1)\n"
        "numba.set_num_threads(1)\n"
        "print(os.environ['NUMBA_NUM_THREADS'], numba.config.NUMBA_NUM_THREADS)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_NUM", "OMP_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cores = str(len(os.sched_getaffinity(0)))
    assert r.stdout.split() == [cores, cores]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell 1 thread from all")
def test_generate_threads_limit_the_numba_pool(tiny_dir):
    """`generate -t 1` must leave Numba's parallel regions one thread (the CLI sets the limit
    before Numba is imported, so it is applied again once the model has loaded)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from dsv4.cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['generate', '-m', sys.argv[1], '-p', 'x', '-n', '2', '-t', '1'],\n"
        "                       standalone_mode=False)\n"
        "assert r.exit_code == 0, r.output\n"
        "import numba\n"                       # not before: the CLI's first limit missed Numba
        "print(numba.get_num_threads())\n")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_NUM", "OMP_"))})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "1"


def test_threading_modes():
    from dsv4.runtime.errors import DsvError
    from dsv4.runtime.threads import threading_env
    omp = threading_env("omp")
    assert omp["NUMBA_THREADING_LAYER"] == "omp" and omp["GOMP_SPINCOUNT"] == "30000"
    spin = threading_env("omp-spin")
    assert spin["OMP_WAIT_POLICY"] == "active" and "GOMP_SPINCOUNT" not in spin
    with pytest.raises(DsvError, match="--threading"):
        threading_env("fastest")


def test_bench_rows_and_record(tiny_dir, tmp_path):
    """`dsv4 bench`: one pp and one tg row per depth, every ceiling measured (before each
    repeat and after the last), rates and ratios consistent with the repeats, a record."""
    from dsv4.runtime.benchmark import paired_ratios
    rec = tmp_path / "rec.md"
    r = dsv4("bench", "-m", str(tiny_dir), "-p", "8", "-n", "4", "-r", "2", "-t", "1", "--depth", "0,16",
             "--json", "--record", str(rec), "--reload-pages")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    rows = out["rows"]
    if out["weight_pages"] is not None:                  # Linux: resident weights, and on 2 MB pages
        shards = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
        assert 0 < out["weight_pages"]["resident_bytes"] <= shards + (64 << 10)
        assert 0 <= out["weight_pages"]["huge_bytes"] <= out["weight_pages"]["resident_bytes"]
        assert "on 2 MB pages" in r.stderr
    assert [(x["test"], x["depth"]) for x in rows] == [("pp8", 0), ("tg4", 0), ("pp8", 16), ("tg4", 16)]
    for x in rows:
        assert len(x["ceilings"]) == 3 and all(c > 0 for c in x["ceilings"])
        assert x["ceiling"] == x["ceilings"][0] and x["ceiling_after"] == x["ceilings"][-1]
        assert x["rate"] == pytest.approx(x["work_per_token"] * x["tps_mean"] / 1e9)
        per = paired_ratios([x["work_per_token"] * t / 1e9 for t in x["tps"]], x["ceilings"])
        assert x["ratio"] == pytest.approx(np.mean(per)) and x["ratio_sd"] == pytest.approx(np.std(per, ddof=1))
    assert rows[1]["work_per_token"] < rows[3]["work_per_token"]          # more KV read at depth
    text = rec.read_text()
    assert "command: `dsv4 bench -m" in text and "tg4" in text and "machine:" in text
    assert "per repeat:" in text                      # each repeat's ratio, as the mean was made of
    for x in rows:
        per = paired_ratios([x["work_per_token"] * t / 1e9 for t in x["tps"]], x["ceilings"])
        line = [ln for ln in text.splitlines() if ln.split()[:3] == [x["test"], str(x["depth"]), "1"] and "=" in ln]
        assert len(line) == 1 and re.findall(r"= ([0-9.]+)%", line[0]) == [f"{100 * q:.1f}" for q in per]


def test_paired_ratios():
    from dsv4.runtime.benchmark import paired_ratios
    assert paired_ratios([10.0, 30.0], [10.0, 30.0, 30.0]) == [0.5, 1.0]
    with pytest.raises(ValueError, match="ceiling"):
        paired_ratios([1.0, 2.0], [1.0, 2.0])


def test_pages_line_hints_only_for_large_checkpoints_on_small_pages():
    """The 2 MB-page line suggests --reload-pages when under 90% of at least 256 MB of
    resident weights is on 2 MB pages (generate prints it as a note then)."""
    from dsv4.cli.common import many_small_pages, pages_line
    from dsv4.runtime.pages import MappedPages
    big, tiny = 12 << 30, 4 << 20
    assert many_small_pages(MappedPages(big, int(0.64 * big)))
    assert "--reload-pages" in pages_line(MappedPages(big, int(0.64 * big)))
    assert "--reload-pages" not in pages_line(MappedPages(big, int(0.64 * big)), hint=False)
    assert not many_small_pages(MappedPages(big, int(0.98 * big)))
    assert not many_small_pages(MappedPages(tiny, 0))
    assert "(98%)" in pages_line(MappedPages(big, int(0.98 * big)))
