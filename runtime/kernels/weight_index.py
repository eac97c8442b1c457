"""How the fast backend finds a weight in its address tables (shared by backend.py and
moe_ops.py)."""
from __future__ import annotations

import numpy as np

from ..linear import LinearW

GEMV_MAX_ROWS = 8                 # up to this many rows per call: gemv kernels, else sgemm


def table_format(w) -> str:
    """The gemv table a weight goes to: its format ('fp8', 'fp4', 'bf16', 'f32')."""
    if isinstance(w, LinearW):
        if w.fmt in ("fp8", "fp4"):
            return w.fmt
        w = w.weight
    return "bf16" if w.dtype == np.uint16 else "f32"


def raw_array(w):
    """The array the table points at (packed FP4 bytes as uint8)."""
    return w.weight.view(np.uint8) if isinstance(w, LinearW) and w.fmt == "fp4" else (
        w.weight if isinstance(w, LinearW) else w)


def out_features(w) -> int:
    return w.out_features if isinstance(w, LinearW) else w.shape[0]


def weight_key(w) -> int:
    """Identity of a weight: its stored array (views made on the fly would differ)."""
    return id(w.weight) if isinstance(w, LinearW) else id(w)
