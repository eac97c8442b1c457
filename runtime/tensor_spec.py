"""The tensor inventory a config implies: names, logical shapes and allowed on-disk formats.

One table serves the loader (validation), the random-checkpoint generator and `dsv4 info`.
A *linear* is a `.weight` with an optional `.scale` sibling; its logical shape is [out, in].
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import FP4_BLOCK, ModelConfig

# kind -> on-disk dtypes accepted for the `.weight` (or the plain tensor)
ALLOWED = {
    "linear": ("F8_E4M3", "BF16", "F32"),          # FP8 block-scaled, or plain float
    "expert": ("I8", "F8_E4M3", "BF16", "F32"),   # MXFP4 (I8 packed), FP8 (Base ckpts), float
    "dense": ("BF16", "F32"),                     # float matrices (embed, head, router, ...)
    "vector": ("BF16", "F32"),                    # norm weights
    "f32": ("F32", "BF16"),                       # hc params, sinks, ape, gate bias
    "index": ("I64", "I32"),                      # tid2eid
}
SCALED = ("F8_E4M3", "I8")                        # formats that need a `.scale` sibling


@dataclass(frozen=True)
class TensorSpec:
    name: str            # for linears/experts the module name without `.weight`
    shape: tuple         # logical shape ([out, in] for linears)
    kind: str

    @property
    def is_linear(self) -> bool:
        return self.kind in ("linear", "expert")

    @property
    def weight_name(self) -> str:
        return self.name + ".weight" if self.is_linear else self.name


def disk_shapes(spec: TensorSpec, dtype: str, cfg: ModelConfig) -> dict[str, tuple]:
    """Expected `{tensor name: shape}` on disk for a spec stored with `dtype`."""
    if not spec.is_linear:
        return {spec.name: spec.shape}
    o, k = spec.shape
    w = spec.name + ".weight"
    if dtype == "I8":
        return {w: (o, k // 2), spec.name + ".scale": (o, k // FP4_BLOCK)}
    if dtype == "F8_E4M3":
        b0, b1 = cfg.weight_block
        return {w: (o, k), spec.name + ".scale": (-(-o // b0), -(-k // b1))}
    return {w: (o, k)}


def layer_specs(cfg: ModelConfig, layer: int) -> list[TensorSpec]:
    """Tensors of one block (main layer or MTP layer `layer >= n_layers`)."""
    p = cfg.layer_prefix(layer)
    d, hcd, mix = cfg.dim, cfg.hc_mult * cfg.dim, cfg.mix_hc
    H, D, Lq = cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    G, Lo, I = cfg.o_groups, cfg.o_lora_rank, cfg.moe_inter_dim
    m = cfg.ratio(layer)

    def t(name, shape, kind):
        return TensorSpec(p + name, tuple(shape), kind)

    out = [t("attn_norm.weight", [d], "vector"), t("ffn_norm.weight", [d], "vector")]
    for part in ("attn", "ffn"):
        out += [t(f"hc_{part}_fn", [mix, hcd], "f32"), t(f"hc_{part}_base", [mix], "f32"),
                t(f"hc_{part}_scale", [3], "f32")]
    out += [t("attn.attn_sink", [H], "f32"),
            t("attn.wq_a", [Lq, d], "linear"), t("attn.q_norm.weight", [Lq], "vector"),
            t("attn.wq_b", [H * D, Lq], "linear"),
            t("attn.wkv", [D, d], "linear"), t("attn.kv_norm.weight", [D], "vector"),
            t("attn.wo_a", [G * Lo, H * D // G], "linear"),
            t("attn.wo_b", [d, G * Lo], "linear")]
    if m > 0:
        c = 2 if m == 4 else 1
        out += _compressor_specs(p + "attn.compressor.", m, c * D, D, d)
    if m == 4:
        Ih, Id = cfg.index_n_heads, cfg.index_head_dim
        out += [t("attn.indexer.wq_b", [Ih * Id, Lq], "linear"),
                t("attn.indexer.weights_proj.weight", [Ih, d], "dense")]
        out += _compressor_specs(p + "attn.indexer.compressor.", 4, 2 * Id, Id, d)
    out.append(t("ffn.gate.weight", [cfg.n_routed_experts, d], "dense"))
    if cfg.is_hash_layer(layer):
        out.append(t("ffn.gate.tid2eid", [cfg.vocab_size, cfg.n_activated_experts], "index"))
    else:
        out.append(t("ffn.gate.bias", [cfg.n_routed_experts], "f32"))
    for e in range(cfg.n_routed_experts):
        q = f"ffn.experts.{e}."
        out += [t(q + "w1", [I, d], "expert"), t(q + "w3", [I, d], "expert"),
                t(q + "w2", [d, I], "expert")]
    out += [t("ffn.shared_experts.w1", [I, d], "linear"),
            t("ffn.shared_experts.w3", [I, d], "linear"),
            t("ffn.shared_experts.w2", [d, I], "linear")]
    if layer >= cfg.n_layers:  # MTP extras
        out += [t("e_proj", [d, d], "linear"), t("h_proj", [d, d], "linear"),
                t("enorm.weight", [d], "vector"), t("hnorm.weight", [d], "vector"),
                t("norm.weight", [d], "vector"),
                t("hc_head_fn", [cfg.hc_mult, hcd], "f32"),
                t("hc_head_base", [cfg.hc_mult], "f32"), t("hc_head_scale", [1], "f32")]
    return out


def _compressor_specs(p: str, m: int, width: int, dc: int, d: int) -> list[TensorSpec]:
    return [TensorSpec(p + "ape", (m, width), "f32"),
            TensorSpec(p + "wkv.weight", (width, d), "dense"),
            TensorSpec(p + "wgate.weight", (width, d), "dense"),
            TensorSpec(p + "norm.weight", (dc,), "vector")]


def global_specs(cfg: ModelConfig) -> list[TensorSpec]:
    V, d, hc = cfg.vocab_size, cfg.dim, cfg.hc_mult
    return [TensorSpec("embed.weight", (V, d), "dense"),
            TensorSpec("head.weight", (V, d), "dense"),
            TensorSpec("norm.weight", (d,), "vector"),
            TensorSpec("hc_head_fn", (hc, hc * d), "f32"),
            TensorSpec("hc_head_base", (hc,), "f32"),
            TensorSpec("hc_head_scale", (1,), "f32")]


def all_specs(cfg: ModelConfig, include_mtp: bool = True) -> list[TensorSpec]:
    out = global_specs(cfg)
    n = cfg.n_total_layers if include_mtp else cfg.n_layers
    for layer in range(n):
        out += layer_specs(cfg, layer)
    return out


def official_dtype(spec: TensorSpec) -> str:
    """The dtype the official checkpoint uses for a spec (what make-model writes)."""
    return {"linear": "F8_E4M3", "expert": "I8", "dense": "BF16", "vector": "BF16",
            "f32": "F32", "index": "I64"}[spec.kind]
