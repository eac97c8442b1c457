"""End-to-end invariants of the forward pass on tiny random checkpoints.

The reference path accumulates in float64 and rounds once, so a token's numbers do not
depend on how the sequence was split into chunks: prefill, chunked prefill from any
position and decode give bit-identical logits, in exact mode and with the model's rounding
steps on (measured noise floor: zero differing logits).
"""
import numpy as np
import pytest

from dsv4.quant.blocks import q4, q8
from dsv4.runtime.errors import DsvError
from dsv4.runtime.kv_cache import Fp4KeyStore, Fp8KVStore
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.model import Model, per_token_weights
from dsv4.runtime.numerics import Numerics
from dsv4.runtime.weights import Checkpoint


def run_chunks(model, ids, sizes, capacity=None):
    cache = model.new_cache(capacity or len(ids))
    out, p = [], 0
    for size in sizes:
        out.append(model.forward(ids[p:p + size], cache))
        p += size
    assert p == len(ids)
    return np.concatenate(out), cache


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# 270 tokens cross the window (8 / 4), many blocks of 4, two blocks of 128, top-k 6 / 3
SPLITS = [137, 1, 1, 1, 2, 5, 1, 60, 1, 1, 3, 57]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
def test_chunked_and_decode_equal_one_shot(request, exact, which):
    model = Model.load(request.getfixturevalue(which), Numerics(exact=exact))
    ids = np.random.default_rng(7).integers(0, model.cfg.vocab_size, sum(SPLITS))
    one, c1 = run_chunks(model, ids, [len(ids)])
    parts, c2 = run_chunks(model, ids, SPLITS)
    assert one.shape == (len(ids), model.cfg.vocab_size)
    assert np.array_equal(one, parts), np.abs(one - parts).max()
    assert c1.pos == c2.pos == len(ids)
    assert np.isfinite(one).all() and one.std() > 0.1


def test_cloned_cache_continues_identically(tiny_dir):
    model = Model.load(tiny_dir)
    ids = np.random.default_rng(2).integers(0, 1000, 60)
    cache = model.new_cache(80)
    model.forward(ids[:50], cache)
    twin = cache.clone()
    a = model.forward(ids[50:], cache)
    b = model.forward(ids[50:], twin)
    assert np.array_equal(a, b) and twin.pos == cache.pos == 60


def test_last_only_matches_all_positions(tiny_dir):
    model = Model.load(tiny_dir)
    ids = np.arange(40) * 7 % model.cfg.vocab_size
    full, _ = run_chunks(model, ids, [40])
    cache = model.new_cache(40)
    last = model.forward(ids, cache, last_only=True)
    assert last.shape == (1, model.cfg.vocab_size) and np.array_equal(last[0], full[-1])


def test_rounding_steps_matter_and_exact_mode_differs(tiny_dir):
    ids = np.random.default_rng(3).integers(0, 1000, 80)
    outs = {}
    for name, num in {"current": Numerics(), "initial": Numerics.from_revision("initial"),
                      "exact": Numerics(exact=True)}.items():
        outs[name], _ = run_chunks(Model.load(tiny_dir, num), ids, [80])
    assert not np.array_equal(outs["current"], outs["initial"])
    assert not np.array_equal(outs["current"], outs["exact"])
    # the rounding is a perturbation, not a different model: most positions stay close
    assert np.median(cosines(outs["current"], outs["exact"])) > 0.9


def test_kv_storage_is_lossless_and_compact(rng):
    x = (rng.standard_normal((50, 128)) * np.exp(rng.uniform(-8, 8, (50, 1)))).astype(np.float32)
    kv = np.concatenate([q8(x[:, :64], 64), x[:, 64:]], axis=1)
    kv[:, 64:] = np.float32(np.round(kv[:, 64:], 2))   # rope dims as written (bf16-exact below)
    from dsv4.quant.formats import bf16_round
    kv[:, 64:] = bf16_round(kv[:, 64:])
    st = Fp8KVStore(50, 128, 64)
    st.write(slice(0, 50), kv)
    assert np.array_equal(st.read(slice(0, 50)), kv)
    assert st.nbytes == 50 * (64 + 1 + 128)
    keys = q4(x, 32)
    ks = Fp4KeyStore(50, 128)
    ks.write(np.arange(50), keys)
    assert np.array_equal(ks.read(np.arange(50)), keys)
    assert ks.nbytes == 50 * (64 + 4)


def test_context_limit_and_bad_ids(tiny_dir):
    model = Model.load(tiny_dir)
    cache = model.new_cache(10)
    model.forward([1, 2, 3], cache)
    with pytest.raises(DsvError, match="exceeds the context length 10"):
        model.forward(list(range(8)), cache)
    with pytest.raises(DsvError, match="outside the vocabulary"):
        model.forward([model.cfg.vocab_size], model.new_cache(4))


def test_per_token_weights_are_the_dense_ones_in_forward_order(tiny_dir):
    ck = Checkpoint(tiny_dir)
    cfg = ModelConfig.load(tiny_dir)
    names = per_token_weights(cfg, ck.names())
    assert len(set(names)) == len(names)
    expected = {n for n in ck.names() if ".experts." not in n and not n.startswith("mtp.")
                and n != "embed.weight"}
    assert set(names) == expected
    layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == cfg.n_layers - 1
    assert "head.weight" in names and "layers.0.ffn.shared_experts.w1.weight" in names
    model = Model.load(tiny_dir, warm=True)            # the background thread is harmless
    cache = model.new_cache(8)
    assert np.isfinite(model.forward([1, 2], cache)).all()


def test_mtp_weights_load(tiny_dir):
    model = Model.load(tiny_dir)
    assert len(model.w.mtp) == model.cfg.n_mtp_layers == 1
    mtp = model.w.mtp[0]
    assert mtp.e_proj.fmt == "fp8" and mtp.block.attn.compressor is None
    assert mtp.block.ffn.bias is not None and mtp.block.ffn.tid2eid is None
