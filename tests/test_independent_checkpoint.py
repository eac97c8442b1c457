"""A checkpoint in the official layout written by an independent tool (the `safetensors`
library, weights quantized from float values, one shard per layer), not by dsv4's generator."""
import json

import numpy as np
import pytest
from safetensors import TensorSpec, serialize_file

from dsv4.quant.blocks import quantize_fp4_weight, quantize_fp8_weight
from dsv4.quant.formats import f32_to_bf16
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.model import Model
from dsv4.runtime.tensor_spec import all_specs
from test_cli import dsv4

LIB_DTYPE = {"F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I8": "int8",
             "BF16": "bfloat16", "F32": "float32", "I64": "int64"}


def _config() -> dict:
    """Written out by hand: sizes unlike the presets (head_dim 192, window 6, 3 heads)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": 1024, "hidden_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 192,
        "qk_rope_head_dim": 64, "q_lora_rank": 256, "o_groups": 3, "o_lora_rank": 128,
        "sliding_window": 6, "compress_ratios": [128, 4, 0, 4, 0],
        "compress_rope_theta": 160000, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 512,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 4096, "index_n_heads": 2, "index_head_dim": 128,
        "index_topk": 5, "n_routed_experts": 5, "n_shared_experts": 1,
        "num_experts_per_tok": 3, "moe_intermediate_size": 256, "num_hash_layers": 1,
        "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 2.0, "swiglu_limit": 7.0,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False, "expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }


def _tensors(spec, rng, cfg):
    shape = spec.shape
    if spec.kind == "expert":
        w, s = quantize_fp4_weight(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1]))
        return {spec.name + ".weight": ("I8", w.view(np.int8)), spec.name + ".scale": ("F8_E8M0", s)}
    if spec.kind == "linear":
        w, s = quantize_fp8_weight(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1]))
        return {spec.name + ".weight": ("F8_E4M3", w), spec.name + ".scale": ("F8_E8M0", s)}
    if spec.kind == "index":
        ids = np.stack([rng.permutation(cfg.n_routed_experts)[:shape[1]] for _ in range(shape[0])])
        return {spec.name: ("I64", ids.astype(np.int64))}
    if spec.kind in ("dense", "vector"):
        scale = 1.0 / np.sqrt(shape[-1]) if spec.kind == "dense" else 0.05
        base = 1.0 if spec.kind == "vector" else 0.0
        return {spec.name: ("BF16", f32_to_bf16(base + scale * rng.standard_normal(shape)))}
    return {spec.name: ("F32", (0.3 * rng.standard_normal(shape)).astype(np.float32))}


@pytest.fixture(scope="module")
def independent_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("indep")
    hf = _config()
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(99)
    shards: dict[str, dict] = {}
    for spec in all_specs(cfg):
        parts = spec.name.split(".")
        group = f"{parts[0]}-{parts[1]}" if parts[0] in ("layers", "mtp") else "globals"
        shards.setdefault(f"part-{group}.safetensors", {}).update(_tensors(spec, rng, cfg))
    weight_map, total = {}, 0
    for fname, tensors in shards.items():
        specs, keep = {}, []
        for name, (dtype, arr) in tensors.items():
            arr = np.ascontiguousarray(arr)
            keep.append(arr)
            specs[name] = TensorSpec(dtype=LIB_DTYPE[dtype], shape=list(arr.shape),
                                     data_ptr=arr.ctypes.data, data_len=arr.nbytes)
            weight_map[name] = fname
            total += arr.nbytes
        serialize_file(specs, str(folder / fname), None)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf))
    for f in ("tokenizer.json", "tokenizer_config.json"):   # a 1024-id tokenizer
        (folder / f).write_bytes((tiny_dir / f).read_bytes())
    return folder


@pytest.mark.parametrize("exact", [False, True])
def test_loads_and_runs_prefill_decode(independent_dir, exact):
    from dsv4.runtime.numerics import Numerics
    m = Model.load(independent_dir, Numerics(exact=exact))
    ids = np.random.default_rng(0).integers(0, 1024, 150)
    c1 = m.new_cache(150)
    full = m.forward(ids, c1)
    c2 = m.new_cache(150)
    parts = [m.forward(ids[:100], c2)] + [m.forward(ids[i:i + 1], c2) for i in range(100, 150)]
    assert np.array_equal(full, np.concatenate(parts))
    assert np.isfinite(full).all() and full.std() > 0.05


def test_cli_generate_on_independent_checkpoint(independent_dir):
    r = dsv4("generate", "-m", str(independent_dir), "-p", "Hello there", "-n", "6", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "generation: 6 tokens" in r.stderr or "stop: eos" in r.stderr
