"""The fast backend end to end against the NumPy reference.

Exact-math mode: the two agree to float32 noise (cosine >= 0.99999 at every position).
Default mode is chaotic on random weights (a float32 difference can flip an FP8 code or a
top-k choice), so there only the bulk agreement is checked; the measured floor is in
docs/numerics.md.
"""
import numpy as np
import pytest

from dsv4.runtime.model import Model
from dsv4.runtime.numerics import Numerics


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run(model, ids, sizes):
    cache = model.new_cache(len(ids))
    out, p = [], 0
    for n in sizes:
        out.append(model.forward(ids[p:p + n], cache))
        p += n
    return np.concatenate(out)


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
def test_exact_mode_agrees_with_reference(request, which):
    folder = request.getfixturevalue(which)
    num = Numerics(exact=True)
    ref, fast = Model.load(folder, num, backend="ref"), Model.load(folder, num, backend="fast")
    ids = np.random.default_rng(5).integers(0, ref.cfg.vocab_size, 270)
    a = run(ref, ids, [270])
    sizes = [140, 1, 1, 2, 50, 1, 1, 75]              # prefill (sgemm), decode (gemv), chunks
    b = run(fast, ids, sizes)
    cos = cosines(a, b)
    assert cos.min() >= 0.99999, (cos.min(), np.argmin(cos))
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_default_mode_agrees_in_bulk(tiny_dir):
    ref, fast = Model.load(tiny_dir, backend="ref"), Model.load(tiny_dir, backend="fast")
    ids = np.random.default_rng(6).integers(0, ref.cfg.vocab_size, 120)
    a, b = run(ref, ids, [120]), run(fast, ids, [100] + [1] * 20)
    assert np.median(cosines(a, b)) > 0.9


@pytest.mark.parametrize("revision", ["current", "initial"])
def test_compiled_moe_step_matches_python_path(tiny_dir, revision, monkeypatch):
    """The decode MoE step as one compiled call (moe_step.py) gives bit-identical logits to
    the step in Python, for single tokens and small chunks; and it did run."""
    from dsv4.runtime.kernels import backend as kb
    num = Numerics.from_revision(revision)
    ids = np.random.default_rng(7).integers(0, 1000, 60)
    logits, ran = {}, []
    orig = kb.FastBackend._moe_compiled

    def spy(self, *a):
        out = orig(self, *a)
        ran.append(out is not None)
        return out
    monkeypatch.setattr(kb.FastBackend, "_moe_compiled", spy)
    for compiled in (False, True):
        fast = Model.load(tiny_dir, num, backend="fast")
        fast.be.compiled_moe = compiled
        ids_m = ids % fast.cfg.vocab_size
        logits[compiled] = run(fast, ids_m, [30, 1, 1, 3, 1, 8, 1, 15])
    assert np.array_equal(logits[False].view(np.uint32), logits[True].view(np.uint32))
    if fast.be.k.variant in ("avx512", "avx2"):
        assert ran and all(ran)                           # every decode step took the compiled path


def _cache_arrays(cache):
    """Every array of a KV cache's state, in a fixed order (stores, compressor states)."""
    out = []
    for lc in cache.layers:
        for part in (lc.ring, lc.comp, lc.index_keys, lc.comp_state, lc.index_state):
            if part is not None:
                out += [v for v in vars(part).values() if isinstance(v, np.ndarray)]
        out.append(np.array([lc.n_comp]))
    return out


def _run_flag(folder, num, flag: str, value: bool, sizes, seed: int, variant: str | None = None, **flags):
    """Logits, cache arrays and last hidden state of a fresh fast model with the backend
    attribute `flag` set to `value` (and any further `flags`; the gemv kernels of
    `variant`), fed random ids in chunks of `sizes`."""
    model = Model.load(folder, num, backend="fast")
    for name, v in {flag: value, **flags}.items():
        setattr(model.be, name, v)
    if variant is not None:
        from dsv4.runtime.kernels import gemv
        model.be.k, model.be.bf16_gemm = gemv.Kernels(variant), False
    ids = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, sum(sizes))
    cache = model.new_cache(len(ids))
    out, p = [], 0
    for n in sizes:
        out.append(model.forward(ids[p:p + n], cache))
        p += n
    return np.concatenate(out), _cache_arrays(cache), cache.last_hidden, model


def _assert_same_runs(a, b):
    (la, sa, ha, _), (lb, sb, hb, _) = a, b
    assert np.array_equal(la.view(np.uint32), lb.view(np.uint32))
    assert np.array_equal(ha, hb)
    assert len(sa) == len(sb) and all(np.array_equal(x, y) for x, y in zip(sa, sb))


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
@pytest.mark.parametrize("revision", ["current", "initial"])
def test_compiled_attention_step_matches_python_path(request, which, revision, monkeypatch):
    """Decode attention as one compiled call (attn_step.py) gives bit-identical logits and
    cache state to the sequence of fast operations, past HCA entries (128 tokens) and the
    window ring's wrap, with multi-token chunks in between; it runs for the default
    numerics and is skipped for the initial revision's bf16 KV."""
    from dsv4.runtime.kernels import attn_ops
    folder = request.getfixturevalue(which)
    num = Numerics.from_revision(revision)
    calls = []
    make = attn_ops.attn_step.attend_one_for

    def spy_make(variant):
        fn = make(variant)

        def spy(*a):
            calls.append(a[2])
            return fn(*a)
        return spy
    monkeypatch.setattr(attn_ops.attn_step, "attend_one_for", spy_make)
    sizes = [5] + [1] * 120 + [7] + [1] * 140 + [3, 1, 1]
    a = _run_flag(folder, num, "compiled_attention", False, sizes, 11)
    b = _run_flag(folder, num, "compiled_attention", True, sizes, 11, fused_decode=False)   # calls from Python
    _assert_same_runs(a, b)
    model = b[3]
    if revision == "initial":
        assert not calls
    else:
        steps = sum(1 for n in sizes if n == 1)
        assert len(calls) == steps * model.cfg.n_layers
        assert set(calls) == {0, 4, 128}                   # every layer kind ran compiled


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
@pytest.mark.parametrize("revision", ["current", "initial"])
def test_compiled_decode_block_matches_per_op_path(request, which, revision, monkeypatch):
    """A decoded token's block as gemv regions around compiled stages (decode_ops.py)
    gives bit-identical logits and cache state to block.py's per-operation path, with
    multi-token chunks in between; it runs for every layer of every single-token step in
    the default numerics, and not for the initial revision (its bf16 KV takes the other
    path)."""
    from dsv4.runtime.kernels import decode_ops
    folder = request.getfixturevalue(which)
    num = Numerics.from_revision(revision)
    calls = []
    orig = decode_ops.decode_step.block_in

    def spy(*a):
        calls.append(1)
        return orig(*a)
    monkeypatch.setattr(decode_ops.decode_step, "block_in", spy)
    sizes = [6] + [1] * 60 + [9] + [1] * 80
    a = _run_flag(folder, num, "compiled_decode", False, sizes, 12)
    b = _run_flag(folder, num, "compiled_decode", True, sizes, 12, fused_decode=False)
    _assert_same_runs(a, b)
    model = b[3]
    steps = sum(1 for n in sizes if n == 1)
    if model.be.k.variant in ("avx512", "avx2"):
        assert len(calls) == (steps * model.cfg.n_layers if revision == "current" else 0)


def _spy_fused(monkeypatch, status=None):
    """Count the calls of the compiled block (decode_layer.layer_step's function); with
    `status`, report that status instead of the real one (after the real call)."""
    from dsv4.runtime.kernels import decode_ops
    calls = []
    make = decode_ops.decode_layer.layer_step

    def spy_make(isa):
        fn = make(isa)

        def spy(*a):
            calls.append(isa)
            n_comp, st = fn(*a)
            return n_comp, st if status is None else status
        return spy
    monkeypatch.setattr(decode_ops.decode_layer, "layer_step", spy_make)
    return calls


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
def test_fused_decode_block_matches_region_calls(request, which, monkeypatch):
    """The decoded block in one compiled call (decode_layer.py) is bit-identical to the
    same sequence called from Python, and runs for every layer of every decode step."""
    folder = request.getfixturevalue(which)
    num = Numerics()
    calls = _spy_fused(monkeypatch)
    sizes = [6] + [1] * 60 + [9] + [1] * 80
    a = _run_flag(folder, num, "fused_decode", False, sizes, 14)
    assert not calls
    b = _run_flag(folder, num, "fused_decode", True, sizes, 14)
    _assert_same_runs(a, b)
    model = b[3]
    if model.be.k.variant in ("avx512", "avx2"):
        assert len(calls) == sum(1 for n in sizes if n == 1) * model.cfg.n_layers


def test_fused_decode_moe_fallback(tiny_dir, monkeypatch):
    """When the compiled block reports that its MoE step did not apply, the backend
    finishes the layer with the general MoE path from the block's buffers: same bits."""
    num = Numerics()
    sizes = [4] + [1] * 12
    a = _run_flag(tiny_dir, num, "fused_decode", True, sizes, 15)
    from dsv4.runtime.kernels import decode_layer
    calls = _spy_fused(monkeypatch, decode_layer.MOE_FALLBACK)
    b = _run_flag(tiny_dir, num, "fused_decode", True, sizes, 15)
    _assert_same_runs(a, b)
    assert calls or b[3].be.k.variant not in ("avx512", "avx2")


def test_compiled_decode_block_avx2_kernels(tiny_dir, monkeypatch):
    """The compiled decode block with the AVX2 gemv kernels (their x layouts) is
    bit-identical to the per-operation path with the same kernels."""
    from dsv4.runtime.kernels import cpu
    if cpu.unmet("avx2", cpu.host_features()):
        pytest.skip("no AVX2 on this host")
    num = Numerics()
    sizes = [5] + [1] * 40 + [3] + [1] * 20
    a = _run_flag(tiny_dir, num, "compiled_decode", False, sizes, 13, "avx2")
    b = _run_flag(tiny_dir, num, "compiled_decode", True, sizes, 13, "avx2", fused_decode=False)
    _assert_same_runs(a, b)
    plans = b[3].be.__dict__.get("_decode_plans", {}).values()
    assert plans and all(plan is not None for _, plan in plans)   # the compiled block ran
    calls = _spy_fused(monkeypatch)
    c = _run_flag(tiny_dir, num, "compiled_decode", True, sizes, 13, "avx2")
    _assert_same_runs(a, c)
    assert calls and set(calls) == {"avx2"}


def test_fused_decode_keeps_each_sequence_apart(tiny_dir):
    """The compiled block's per-sequence arguments (decode_ops._seq_pack) follow the cache
    they came from: two sequences decoded in turns on one model, one of them cloned half
    way, give the bits each gives alone, and a dropped cache's pack is released."""
    import gc
    model = Model.load(tiny_dir, backend="fast")
    rng = np.random.default_rng(16)
    ids = [rng.integers(0, model.cfg.vocab_size, 40) for _ in range(2)]

    def alone(seq):
        cache = model.new_cache(40)
        return [model.forward(seq[:8], cache)] + [model.forward(seq[i:i + 1], cache) for i in range(8, 40)]
    want = [alone(s) for s in ids]
    caches = [model.new_cache(40) for _ in ids]
    got = [[model.forward(s[:8], c)] for s, c in zip(ids, caches)]
    for i in range(8, 40):
        if i == 24:
            caches[0] = caches[0].clone()             # same state, new arrays
        for s, c, out in zip(ids, caches, got):
            out.append(model.forward(s[i:i + 1], c))
    for a, b in zip(want, got):
        assert all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a, b))
    packs = model.be.__dict__.get("_seq_packs", {})
    if model.be.k.variant in ("avx512", "avx2"):
        assert len(packs) == 2 * model.cfg.n_layers     # the clone's and the second cache's
    del caches, c
    gc.collect()
    assert not packs
