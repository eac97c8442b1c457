"""Model configuration: one frozen dataclass read from the checkpoint's HF config.json.

Field names follow the official inference code (`dim`, `n_heads`, ...); `from_hf` maps the
HF keys onto them and validates, naming the offending key in every error.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

FP4_BLOCK = 32          # MXFP4: one e8m0 scale per 32 inputs (a property of the format)
KV_FP8_BLOCK = 64       # block of the FP8 round trip on cached KV nope dims
INDEX_FP4_BLOCK = 32    # block of the FP4 round trip on indexer queries and keys

# HF key -> (field name, type, default or REQUIRED)
REQUIRED = object()
_HF_KEYS: dict[str, tuple[str, type, Any]] = {
    "vocab_size": ("vocab_size", int, REQUIRED),
    "hidden_size": ("dim", int, REQUIRED),
    "num_hidden_layers": ("n_layers", int, REQUIRED),
    "num_attention_heads": ("n_heads", int, REQUIRED),
    "num_key_value_heads": ("n_kv_heads", int, 1),
    "head_dim": ("head_dim", int, REQUIRED),
    "qk_rope_head_dim": ("rope_dim", int, REQUIRED),
    "q_lora_rank": ("q_lora_rank", int, REQUIRED),
    "o_groups": ("o_groups", int, REQUIRED),
    "o_lora_rank": ("o_lora_rank", int, REQUIRED),
    "sliding_window": ("window", int, REQUIRED),
    "compress_ratios": ("compress_ratios", list, REQUIRED),
    "compress_rope_theta": ("compress_rope_theta", float, REQUIRED),
    "rope_theta": ("rope_theta", float, REQUIRED),
    "max_position_embeddings": ("max_position_embeddings", int, 1 << 20),
    "index_n_heads": ("index_n_heads", int, REQUIRED),
    "index_head_dim": ("index_head_dim", int, REQUIRED),
    "index_topk": ("index_topk", int, REQUIRED),
    "n_routed_experts": ("n_routed_experts", int, REQUIRED),
    "n_shared_experts": ("n_shared_experts", int, 1),
    "num_experts_per_tok": ("n_activated_experts", int, REQUIRED),
    "moe_intermediate_size": ("moe_inter_dim", int, REQUIRED),
    "num_hash_layers": ("n_hash_layers", int, 0),
    "scoring_func": ("score_func", str, "sqrtsoftplus"),
    "routed_scaling_factor": ("route_scale", float, 1.0),
    "swiglu_limit": ("swiglu_limit", float, 0.0),
    "hc_mult": ("hc_mult", int, REQUIRED),
    "hc_sinkhorn_iters": ("hc_sinkhorn_iters", int, 20),
    "hc_eps": ("hc_eps", float, 1e-6),
    "rms_norm_eps": ("norm_eps", float, 1e-6),
    "num_nextn_predict_layers": ("n_mtp_layers", int, 1),
    "bos_token_id": ("bos_token_id", int, 0),
    "eos_token_id": ("eos_token_id", int, 1),
    "tie_word_embeddings": ("tie_word_embeddings", bool, False),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    compress_ratios: tuple[int, ...]
    compress_rope_theta: float
    rope_theta: float
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    score_func: str
    route_scale: float
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    n_mtp_layers: int
    bos_token_id: int
    eos_token_id: int
    tie_word_embeddings: bool
    rope_factor: float = 1.0
    original_seq_len: int = 0          # 0 = YaRN off
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    expert_dtype: str | None = None    # "fp4"; None when the key is absent (initial revision)
    weight_block: tuple[int, int] = (128, 128)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------ derived sizes
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def act_block(self) -> int:
        """Block of the FP8 activation quantization before FP8/FP4 linears."""
        return self.weight_block[1]

    @property
    def mix_hc(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def n_total_layers(self) -> int:
        return self.n_layers + self.n_mtp_layers

    def ratio(self, layer: int) -> int:
        """Compression ratio m of a layer (main layers, then MTP layers)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def layer_kind(self, layer: int) -> str:
        m = self.ratio(layer)
        return "SWA" if m == 0 else ("CSA" if m == 4 else "HCA")

    def layer_prefix(self, layer: int) -> str:
        return f"layers.{layer}." if layer < self.n_layers else f"mtp.{layer - self.n_layers}."

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        kw: dict[str, Any] = {}
        for key, (name, typ, default) in _HF_KEYS.items():
            if key not in cfg or cfg[key] is None:
                if default is REQUIRED:
                    raise ConfigError(f"{source}: missing key '{key}'")
                kw[name] = default
                continue
            kw[name] = _typed(cfg[key], typ, key, source)
        kw["compress_ratios"] = tuple(_typed(v, int, "compress_ratios", source)
                                      for v in kw["compress_ratios"])
        kw.update(_rope_scaling(cfg.get("rope_scaling"), source))
        kw.update(_quantization(cfg, source))
        kw["raw"] = dict(cfg)
        conf = cls(**kw)
        conf.validate(source)
        return conf

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(data, str(path))

    def validate(self, source: str = "config.json") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' {why}")

        positive = {"vocab_size": self.vocab_size, "hidden_size": self.dim,
                    "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                    "head_dim": self.head_dim, "q_lora_rank": self.q_lora_rank,
                    "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
                    "sliding_window": self.window, "index_n_heads": self.index_n_heads,
                    "index_head_dim": self.index_head_dim, "index_topk": self.index_topk,
                    "n_routed_experts": self.n_routed_experts, "hc_mult": self.hc_mult,
                    "num_experts_per_tok": self.n_activated_experts,
                    "moe_intermediate_size": self.moe_inter_dim,
                    "hc_sinkhorn_iters": self.hc_sinkhorn_iters}
        for key, v in positive.items():
            if v <= 0:
                raise bad(key, f"must be positive, got {v}")
        for key, v in {"num_hash_layers": self.n_hash_layers,
                       "num_nextn_predict_layers": self.n_mtp_layers}.items():
            if v < 0:
                raise bad(key, f"must be >= 0, got {v}")
        if self.n_kv_heads != 1:
            raise bad("num_key_value_heads", f"must be 1 (one shared KV head), got {self.n_kv_heads}")
        if self.n_shared_experts != 1:
            raise bad("n_shared_experts", f"must be 1, got {self.n_shared_experts}")
        if not 0 < self.rope_dim < self.head_dim or self.rope_dim % 2:
            raise bad("qk_rope_head_dim", f"must be even and below head_dim={self.head_dim}, "
                      f"got {self.rope_dim}")
        if self.rope_dim > self.index_head_dim:
            raise bad("index_head_dim", f"must be >= qk_rope_head_dim={self.rope_dim}")
        if self.index_head_dim & (self.index_head_dim - 1):
            raise bad("index_head_dim", f"must be a power of two (Hadamard), got {self.index_head_dim}")
        if self.n_heads % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads={self.n_heads}")
        if self.n_activated_experts > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_hash_layers > self.n_layers:
            raise bad("num_hash_layers", f"exceeds num_hidden_layers={self.n_layers}")
        if len(self.compress_ratios) != self.n_total_layers:
            raise bad("compress_ratios", f"has {len(self.compress_ratios)} entries, expected "
                      f"num_hidden_layers + num_nextn_predict_layers = {self.n_total_layers}")
        for i, m in enumerate(self.compress_ratios):
            if m < 0 or (m and m < 2):
                raise bad("compress_ratios", f"entry {i} = {m}: expected 0 or a ratio >= 2")
        for i in range(self.n_layers, self.n_total_layers):
            if self.compress_ratios[i] != 0:
                raise bad("compress_ratios", f"entry {i} belongs to an MTP layer and must be 0")
        if self.score_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise bad("scoring_func", f"unknown value '{self.score_func}'")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "must be false (V4 has a separate head)")
        if self.expert_dtype not in (None, "fp4", "fp8"):
            raise bad("expert_dtype", f"unknown value '{self.expert_dtype}'")
        for key, v in (("hidden_size", self.dim), ("moe_intermediate_size", self.moe_inter_dim)):
            if v % FP4_BLOCK:
                raise bad(key, f"must be a multiple of {FP4_BLOCK} (MXFP4 scale blocks), got {v}")
        if self.index_head_dim % INDEX_FP4_BLOCK:
            raise bad("index_head_dim", f"must be a multiple of {INDEX_FP4_BLOCK}")
        for tok in ("bos_token_id", "eos_token_id"):
            v = getattr(self, tok)
            if not 0 <= v < self.vocab_size:
                raise bad(tok, f"= {v} is outside the vocabulary [0, {self.vocab_size})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _typed(v: Any, typ: type, key: str, source: str) -> Any:
    if typ is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {v!r}")
        return v
    if typ is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {v!r}")
        return int(v)
    if typ is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{source}: '{key}' must be a number, got {v!r}")
        return float(v)
    if typ is str:
        if not isinstance(v, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {v!r}")
        return v
    if typ is list:
        if not isinstance(v, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {v!r}")
        return v
    raise TypeError(typ)


def _rope_scaling(rs: Any, source: str) -> dict:
    if rs is None:
        return {"rope_factor": 1.0, "original_seq_len": 0}
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be an object")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: 'rope_scaling.type' must be 'yarn', got {kind!r}")
    out = {}
    for key, name, typ in (("factor", "rope_factor", float),
                           ("original_max_position_embeddings", "original_seq_len", int),
                           ("beta_fast", "beta_fast", float), ("beta_slow", "beta_slow", float)):
        if key not in rs:
            raise ConfigError(f"{source}: missing key 'rope_scaling.{key}'")
        out[name] = _typed(rs[key], typ, f"rope_scaling.{key}", source)
    if out["rope_factor"] <= 0 or out["original_seq_len"] <= 0:
        raise ConfigError(f"{source}: 'rope_scaling' factor and original_max_position_embeddings "
                          "must be positive")
    return out


def _quantization(cfg: dict, source: str) -> dict:
    out: dict[str, Any] = {"expert_dtype": cfg.get("expert_dtype")}
    q = cfg.get("quantization_config")
    if q is None:
        return out
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be an object")
    for key, want in (("quant_method", "fp8"), ("fmt", "e4m3"), ("scale_fmt", "ue8m0")):
        if key in q and q[key] != want:
            raise ConfigError(f"{source}: 'quantization_config.{key}' = {q[key]!r} is not "
                              f"supported (expected {want!r})")
    blk = q.get("weight_block_size", [128, 128])
    if (not isinstance(blk, list) or len(blk) != 2
            or not all(isinstance(b, int) and b > 0 for b in blk)):
        raise ConfigError(f"{source}: 'quantization_config.weight_block_size' must be two "
                          f"positive integers, got {blk!r}")
    out["weight_block"] = (blk[0], blk[1])
    return out
