"""Shared fixtures: tiny random checkpoints in the official layout, made once per session."""
from __future__ import annotations

import os

# BLAS threads fighting over two shared cores make small matmuls 5-10x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Numba's cache in a folder keyed on the kernel sources, as the CLI does, before Numba
# loads: its own check misses edits to helpers that other files' functions inline.
from dsv4.runtime.kernels.sources import use_default_cache  # noqa: E402

use_default_cache()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(1, user_api="blas")

from dsv4.runtime.presets import preset_config  # noqa: E402
from dsv4.runtime.random_checkpoint import write_random_checkpoint  # noqa: E402


def odd_config() -> dict:
    """A tiny model with other sizes than the preset: every layer kind, small window and
    top-k, a small swiglu_limit so the clamps act, short YaRN original length."""
    hf = preset_config("tiny")
    hf.update({"sliding_window": 4, "index_topk": 3, "swiglu_limit": 0.5,
               "num_hidden_layers": 5, "num_hash_layers": 1,
               "compress_ratios": [4, 128, 0, 4, 128, 0],
               "rope_scaling": {**hf["rope_scaling"], "original_max_position_embeddings": 32}})
    return hf


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_random_checkpoint(path, preset_config("tiny"), seed=0, shard_bytes=3 << 20)
    return path


@pytest.fixture(scope="session")
def odd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "odd"
    write_random_checkpoint(path, odd_config(), seed=1)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
