"""Where the bytes are: checkpoint bytes by component and bytes streamed per decoded token."""
from __future__ import annotations

from collections import defaultdict

from .config import ModelConfig
from .random_checkpoint import spec_bytes
from .tensor_spec import TensorSpec, all_specs, disk_shapes
from .weights import DTYPES

COMPONENTS = ("attention", "routed experts", "shared experts", "router", "hyper-connections",
              "norms", "embedding", "head", "mtp")


def component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if ".ffn.experts." in name:
        return "routed experts"
    if ".ffn.shared_experts." in name:
        return "shared experts"
    if ".ffn.gate." in name:
        return "router"
    if ".attn." in name:
        return "attention"
    if "hc_" in name:
        return "hyper-connections"
    return "norms"


def spec_disk_bytes(spec: TensorSpec, cfg: ModelConfig, ckpt=None) -> int:
    """Bytes of a spec as stored: read from the checkpoint when given, else the official format."""
    if ckpt is None:
        return spec_bytes(spec, cfg)
    dtype = ckpt.info(spec.weight_name).dtype
    total = 0
    for name in disk_shapes(spec, dtype, cfg):
        total += ckpt.info(name).nbytes
    return total


def bytes_by_component(cfg: ModelConfig, ckpt=None) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for spec in all_specs(cfg):
        out[component(spec.name)] += spec_disk_bytes(spec, cfg, ckpt)
    return dict(out)


def bytes_per_token(cfg: ModelConfig, ckpt=None) -> dict[str, float]:
    """Weight bytes one decode step reads, by component (main model, no MTP, no KV).

    Routed experts count k of E per layer; the embedding one row; tid2eid one row per
    hash layer; everything else (attention incl. compressors and indexer, shared expert,
    router, hyper-connections, norms, head) in full.
    """
    k, E = cfg.n_activated_experts, cfg.n_routed_experts
    out: dict[str, float] = defaultdict(float)
    for spec in all_specs(cfg, include_mtp=False):
        comp = component(spec.name)
        b = spec_disk_bytes(spec, cfg, ckpt)
        if comp == "routed experts":
            b *= k / E
        elif comp == "embedding" or spec.name.endswith("tid2eid"):
            b /= spec.shape[0]
        out[comp] += b
    return dict(out)


def dtype_size(dtype: str) -> float:
    return DTYPES[dtype][1] / 8
