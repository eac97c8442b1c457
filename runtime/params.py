"""Model weights as typed, zero-copy views into the checkpoint, validated against the config.

Every tensor the config implies is checked for presence, on-disk dtype and shape (with its
`.scale` sibling for FP8/FP4) before anything runs; errors name the tensor and its file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .hc import HcParams
from .linear import LinearW, as_f32
from .tensor_spec import ALLOWED, SCALED, TensorSpec, all_specs, disk_shapes
from .weights import Checkpoint


@dataclass(frozen=True)
class CompressorW:
    ape: np.ndarray          # f32 [m, c*Dc]
    wkv: np.ndarray          # raw bf16/f32 [c*Dc, d]
    wgate: np.ndarray        # raw bf16/f32 [c*Dc, d]
    norm: np.ndarray         # raw [Dc]
    ratio: int
    overlap: bool
    head_dim: int            # Dc


@dataclass(frozen=True)
class IndexerW:
    wq_b: LinearW            # [Ih*Id, Lq]
    weights_proj: np.ndarray  # raw [Ih, d]
    compressor: CompressorW


@dataclass(frozen=True)
class AttnW:
    sink: np.ndarray          # f32 [H]
    wq_a: LinearW
    q_norm: np.ndarray
    wq_b: LinearW
    wkv: LinearW
    kv_norm: np.ndarray
    wo_a: LinearW
    wo_b: LinearW
    compressor: CompressorW | None
    indexer: IndexerW | None


@dataclass(frozen=True)
class ExpertW:
    w1: LinearW
    w2: LinearW
    w3: LinearW


@dataclass(frozen=True)
class MoEW:
    gate: np.ndarray              # raw [E, d]
    bias: np.ndarray | None       # f32 [E] (score-routed layers)
    tid2eid: np.ndarray | None    # int [vocab, k] (hash layers)
    experts: tuple[ExpertW, ...]
    shared: ExpertW


@dataclass(frozen=True)
class BlockW:
    layer: int
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    hc_attn: HcParams
    hc_ffn: HcParams
    attn: AttnW
    ffn: MoEW


@dataclass(frozen=True)
class MtpW:
    block: BlockW
    e_proj: LinearW
    h_proj: LinearW
    enorm: np.ndarray
    hnorm: np.ndarray
    norm: np.ndarray
    hc_head: HcParams


@dataclass(frozen=True)
class ModelWeights:
    embed: np.ndarray        # raw [V, d]
    head: np.ndarray         # raw [V, d]
    norm: np.ndarray
    hc_head: HcParams
    blocks: tuple[BlockW, ...]
    mtp: tuple[MtpW, ...]


class _Reader:
    """Validates each requested tensor against its spec and returns typed views."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg
        self.specs = {s.name: s for s in all_specs(cfg)}

    def _where(self, name: str) -> str:
        return f"{self.ckpt.info(name).file.name}" if name in self.ckpt else str(self.ckpt.folder)

    def _check(self, spec: TensorSpec) -> str:
        wname = spec.weight_name
        if wname not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.folder}: tensor '{wname}' is missing")
        info = self.ckpt.info(wname)
        if info.dtype not in ALLOWED[spec.kind]:
            raise CheckpointError(f"{info.file.name}: tensor '{wname}' has dtype {info.dtype}, "
                                  f"expected one of {', '.join(ALLOWED[spec.kind])}")
        for name, shape in disk_shapes(spec, info.dtype, self.cfg).items():
            if name not in self.ckpt:
                raise CheckpointError(f"{self.ckpt.folder}: tensor '{name}' is missing "
                                      f"(needed by {info.dtype} weight '{wname}')")
            got = self.ckpt.info(name)
            if tuple(got.shape) != tuple(shape):
                raise CheckpointError(f"{got.file.name}: tensor '{name}' has shape "
                                      f"{list(got.shape)}, expected {list(shape)}")
            if name.endswith(".scale") and got.dtype != "F8_E8M0":
                raise CheckpointError(f"{got.file.name}: tensor '{name}' has dtype {got.dtype}, "
                                      "expected F8_E8M0")
        return info.dtype

    def tensor(self, name: str) -> np.ndarray:
        self._check(self.specs[name])
        return self.ckpt.tensor(name)

    def f32(self, name: str) -> np.ndarray:
        return as_f32(self.tensor(name))

    def linear(self, name: str) -> LinearW:
        spec = self.specs[name]
        dtype = self._check(spec)
        o, k = spec.shape
        w = self.ckpt.tensor(name + ".weight")
        scale = self.ckpt.tensor(name + ".scale") if dtype in SCALED else None
        fmt = {"F8_E4M3": "fp8", "I8": "fp4"}.get(dtype, "float")
        return LinearW(name, fmt, w, scale, o, k, self.cfg.weight_block)

    def hc(self, prefix: str) -> HcParams:
        return HcParams(self.f32(prefix + "_fn"), self.f32(prefix + "_base"),
                        self.f32(prefix + "_scale"))


def load_weights(ckpt: Checkpoint, cfg: ModelConfig, with_mtp: bool = True) -> ModelWeights:
    r = _Reader(ckpt, cfg)
    blocks = tuple(_block(r, cfg, layer) for layer in range(cfg.n_layers))
    mtp = ()
    if with_mtp:
        mtp = tuple(_mtp(r, cfg, layer) for layer in range(cfg.n_layers, cfg.n_total_layers))
    return ModelWeights(embed=r.tensor("embed.weight"), head=r.tensor("head.weight"),
                        norm=r.f32("norm.weight"), hc_head=r.hc("hc_head"),
                        blocks=blocks, mtp=mtp)


def _compressor(r: _Reader, p: str, ratio: int, dc: int) -> CompressorW:
    return CompressorW(ape=r.f32(p + "ape"), wkv=r.tensor(p + "wkv.weight"),
                       wgate=r.tensor(p + "wgate.weight"), norm=r.f32(p + "norm.weight"),
                       ratio=ratio, overlap=ratio == 4, head_dim=dc)


def _block(r: _Reader, cfg: ModelConfig, layer: int) -> BlockW:
    p = cfg.layer_prefix(layer)
    m = cfg.ratio(layer)
    comp = _compressor(r, p + "attn.compressor.", m, cfg.head_dim) if m > 0 else None
    indexer = None
    if m == 4:
        q = p + "attn.indexer."
        indexer = IndexerW(wq_b=r.linear(q + "wq_b"),
                           weights_proj=r.tensor(q + "weights_proj.weight"),
                           compressor=_compressor(r, q + "compressor.", 4, cfg.index_head_dim))
    attn = AttnW(sink=r.f32(p + "attn.attn_sink"), wq_a=r.linear(p + "attn.wq_a"),
                 q_norm=r.f32(p + "attn.q_norm.weight"), wq_b=r.linear(p + "attn.wq_b"),
                 wkv=r.linear(p + "attn.wkv"), kv_norm=r.f32(p + "attn.kv_norm.weight"),
                 wo_a=r.linear(p + "attn.wo_a"), wo_b=r.linear(p + "attn.wo_b"),
                 compressor=comp, indexer=indexer)
    hashed = cfg.is_hash_layer(layer)
    tid2eid = r.tensor(p + "ffn.gate.tid2eid") if hashed else None
    if tid2eid is not None and (tid2eid.min() < 0 or tid2eid.max() >= cfg.n_routed_experts):
        raise CheckpointError(f"{r._where(p + 'ffn.gate.tid2eid')}: tensor "
                              f"'{p}ffn.gate.tid2eid' holds expert ids outside "
                              f"[0, {cfg.n_routed_experts})")
    experts = tuple(ExpertW(*(r.linear(f"{p}ffn.experts.{e}.{w}") for w in ("w1", "w2", "w3")))
                    for e in range(cfg.n_routed_experts))
    shared = ExpertW(*(r.linear(f"{p}ffn.shared_experts.{w}") for w in ("w1", "w2", "w3")))
    ffn = MoEW(gate=r.tensor(p + "ffn.gate.weight"),
               bias=None if hashed else r.f32(p + "ffn.gate.bias"),
               tid2eid=tid2eid, experts=experts, shared=shared)
    return BlockW(layer=layer, attn_norm=r.f32(p + "attn_norm.weight"),
                  ffn_norm=r.f32(p + "ffn_norm.weight"), hc_attn=r.hc(p + "hc_attn"),
                  hc_ffn=r.hc(p + "hc_ffn"), attn=attn, ffn=ffn)


def _mtp(r: _Reader, cfg: ModelConfig, layer: int) -> MtpW:
    p = cfg.layer_prefix(layer)
    return MtpW(block=_block(r, cfg, layer), e_proj=r.linear(p + "e_proj"),
                h_proj=r.linear(p + "h_proj"), enorm=r.f32(p + "enorm.weight"),
                hnorm=r.f32(p + "hnorm.weight"), norm=r.f32(p + "norm.weight"),
                hc_head=r.hc(p + "hc_head"))
