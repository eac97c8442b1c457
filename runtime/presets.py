"""Built-in model presets as HF config.json dictionaries.

`flash` and `pro` carry the exact official values (for planning and for shaped benchmark
checkpoints with fewer layers/experts); `tiny` and `small` are scaled-down but structurally
complete models for tests and demos (SWA, CSA, HCA and hash layers, MXFP4 experts, MTP).
"""
from __future__ import annotations

import copy

from .errors import DsvError

_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
         "beta_fast": 32, "beta_slow": 1}
_COMMON = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "num_key_value_heads": 1, "qk_rope_head_dim": 64, "head_dim": 512,
    "compress_rope_theta": 160000, "rope_theta": 10000, "max_position_embeddings": 1048576,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "topk_method": "noaux_tc",
    "swiglu_limit": 10.0, "hidden_act": "silu", "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16", "sliding_window": 128, "index_n_heads": 64,
    "index_head_dim": 128, "quantization_config": _QUANT, "rope_scaling": _YARN,
    "vocab_size": 129280,
}


def _flash() -> dict:
    return {**_COMMON, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
            "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "index_topk": 512,
            "n_routed_experts": 256, "moe_intermediate_size": 2048,
            "routed_scaling_factor": 1.5,
            "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0]}


def _pro() -> dict:
    return {**_COMMON, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
            "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024, "index_topk": 1024,
            "n_routed_experts": 384, "moe_intermediate_size": 3072,
            "routed_scaling_factor": 2.5,
            "compress_ratios": [128, 128] + [4, 128] * 29 + [4] + [0]}


def _small() -> dict:
    """~0.7 GB: real head_dim, window, indexer head dim and vocabulary; fewer of everything else."""
    return {**_COMMON, "hidden_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8,
            "q_lora_rank": 512, "o_groups": 2, "o_lora_rank": 512, "index_n_heads": 8,
            "index_topk": 64, "n_routed_experts": 16, "moe_intermediate_size": 512,
            "num_hash_layers": 2, "routed_scaling_factor": 1.5,
            "compress_ratios": [0, 4, 128, 4, 128, 4] + [0]}


def _tiny() -> dict:
    """A few MB: every structural feature with small sizes (window 8, top-k 6, toy vocabulary)."""
    return {**_COMMON, "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 5,
            "num_attention_heads": 4, "head_dim": 128, "q_lora_rank": 128, "o_groups": 2,
            "o_lora_rank": 128, "sliding_window": 8, "index_n_heads": 4, "index_head_dim": 64,
            "index_topk": 6, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 128, "num_hash_layers": 2, "routed_scaling_factor": 1.5,
            "swiglu_limit": 10.0, "max_position_embeddings": 65536,
            "rope_scaling": {**_YARN, "original_max_position_embeddings": 256},
            "compress_ratios": [0, 4, 128, 4, 128] + [0]}


_PRESETS = {"tiny": _tiny, "small": _small, "flash": _flash, "pro": _pro}
PRESET_NAMES = tuple(_PRESETS)


def preset_config(name: str, layers: int | None = None, experts: int | None = None) -> dict:
    """HF config dict of a preset, optionally with fewer main layers / routed experts.

    Fewer layers keep the official layer schedule's prefix (plus the MTP layers' entries).
    """
    if name not in _PRESETS:
        raise DsvError(f"unknown preset '{name}' (choose from {', '.join(PRESET_NAMES)})")
    cfg = copy.deepcopy(_PRESETS[name]())
    n = cfg["num_hidden_layers"]
    if layers is not None:
        if layers < 1:
            raise DsvError(f"--layers must be >= 1, got {layers}")
        ratios = cfg["compress_ratios"]
        main, mtp = ratios[:n], ratios[n:]
        reps = -(-layers // n)
        cfg["compress_ratios"] = (main * reps)[:layers] + mtp
        cfg["num_hidden_layers"] = layers
        cfg["num_hash_layers"] = min(cfg["num_hash_layers"], layers)
    if experts is not None:
        if experts < 1:
            raise DsvError(f"--experts must be >= 1, got {experts}")
        cfg["n_routed_experts"] = experts
        cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], experts)
    return cfg


def generation_config(cfg: dict) -> dict:
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "do_sample": True, "temperature": 1.0, "top_p": 1.0}
