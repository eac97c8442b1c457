"""Config parsing, validation messages and presets."""
import pytest

from dsv4.runtime.config import ModelConfig
from dsv4.runtime.errors import ConfigError, DsvError
from dsv4.runtime.presets import PRESET_NAMES, preset_config


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_are_valid(name):
    cfg = ModelConfig.from_hf(preset_config(name))
    assert len(cfg.compress_ratios) == cfg.n_layers + cfg.n_mtp_layers


def test_official_values():
    flash = ModelConfig.from_hf(preset_config("flash"))
    pro = ModelConfig.from_hf(preset_config("pro"))
    assert (flash.dim, flash.n_layers, flash.n_heads, flash.n_routed_experts) == (4096, 43, 64, 256)
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.n_routed_experts) == (7168, 61, 128, 384)
    kinds = [flash.layer_kind(i) for i in range(43)]
    assert kinds.count("SWA") == 2 and kinds.count("CSA") == 21 and kinds.count("HCA") == 20
    kinds = [pro.layer_kind(i) for i in range(61)]
    assert kinds.count("SWA") == 0 and kinds.count("CSA") == 30 and kinds.count("HCA") == 31
    assert flash.original_seq_len == 65536 and flash.rope_factor == 16
    assert flash.weight_block == (128, 128) and flash.expert_dtype == "fp4"


def test_fewer_layers_keep_the_schedule_prefix():
    hf = preset_config("flash", layers=16, experts=32)
    assert hf["compress_ratios"] == [0, 0] + [4, 128] * 7 + [0]
    assert hf["n_routed_experts"] == 32 and hf["num_experts_per_tok"] == 6
    with pytest.raises(DsvError, match="unknown preset 'huge'"):
        preset_config("huge")


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda c: c.update(hidden_size="big"), "'hidden_size' must be an integer"),
    (lambda c: c.update(compress_ratios=[0, 4]), "'compress_ratios' has 2 entries"),
    (lambda c: c.update(compress_ratios=[0, 4, 128, 4, 128, 4]), "MTP layer and must be 0"),
    (lambda c: c.update(num_key_value_heads=2), "'num_key_value_heads' must be 1"),
    (lambda c: c.update(o_groups=3), "'o_groups' must divide"),
    (lambda c: c.update(index_head_dim=96), "power of two"),
    (lambda c: c.update(num_experts_per_tok=9), "exceeds n_routed_experts"),
    (lambda c: c.update(scoring_func="relu"), "unknown value 'relu'"),
    (lambda c: c.update(tie_word_embeddings=True), "must be false"),
    (lambda c: c["rope_scaling"].pop("factor"), "rope_scaling.factor"),
    (lambda c: c["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
    (lambda c: c.update(eos_token_id=5000), "'eos_token_id' = 5000"),
])
def test_validation_names_the_key(change, needle):
    hf = preset_config("tiny")
    change(hf)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf(hf, "config.json")


def test_optional_keys_take_reference_defaults():
    hf = preset_config("tiny")
    for k in ("rms_norm_eps", "hc_eps", "num_nextn_predict_layers", "expert_dtype",
              "quantization_config"):
        hf.pop(k)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.norm_eps == 1e-6 and cfg.n_mtp_layers == 1 and cfg.expert_dtype is None
