"""The KV compressor: gated softmax pooling of every m consecutive tokens into one entry.

Per token (float32): u = x Wkv^T, g = x Wgate^T, score = g + ape[p mod m].
- m = 128 (no overlap): entry b pools tokens bm .. bm+m-1, softmax over the m tokens per channel.
- m = 4 (overlap, c = 2): entry b pools 2m rows per channel: the first half of the channels
  of the previous block's tokens and the second half of its own tokens (absent for b = 0).
A completed entry is RMS-normalised and rotated at position bm (its block's first token);
the caller applies the FP8 or Hadamard+FP4 rounding of its cache.

The state (`CompressorState`) keeps the rows of the unfinished block, so chunks of any
length starting at any position give the same entries as one pass.
"""
from __future__ import annotations

import numpy as np

from ..kv_cache import CompressorState
from ..nn import F32
from ..params import CompressorW
from ..rope import Rope


def pool(kv: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per-channel softmax pooling over axis -2: kv, score [..., rows, C] -> [..., C]."""
    s64 = score.astype(np.float64)
    mx = np.max(s64, axis=-2, keepdims=True)
    e = np.exp(s64 - mx)
    return (np.sum(e * kv, axis=-2) / np.sum(e, axis=-2)).astype(F32)


def advance(w: CompressorW, st: CompressorState, u: np.ndarray, g: np.ndarray, p0: int):
    """Feed tokens p0 .. p0+S-1 by their projections u = x wkv^T, g = x wgate^T
    [S, c*Dc]; return (first entry index, raw pooled entries [n, Dc])."""
    S = u.shape[0]
    m, dc = w.ratio, w.head_dim
    r0 = p0 % m
    if r0 + S < m:                       # the block stays unfinished (most decode steps)
        st.kv[r0:r0 + S] = u
        st.score[r0:r0 + S] = g + w.ape[r0:r0 + S]
        return p0 // m, np.zeros((0, dc), F32)
    score = (g + w.ape[np.arange(p0, p0 + S) % m]).astype(F32)
    # rows of the unfinished block that precede this chunk, then the chunk's rows
    kv_all = np.concatenate([st.kv[:r0], u])              # [r0 + S, c*Dc]
    sc_all = np.concatenate([st.score[:r0], score])
    first = p0 // m
    n_done = (r0 + S) // m
    kv_blk = kv_all[:n_done * m].reshape(n_done, m, w.ape.shape[1])   # [n, m, c*Dc]
    sc_blk = sc_all[:n_done * m].reshape(n_done, m, w.ape.shape[1])
    if n_done == 0:
        entries = np.zeros((0, dc), F32)
    elif w.overlap:
        prev_kv = np.concatenate([st.prev_kv[None], kv_blk[:-1]])[:, :, :dc]   # [n, m, Dc]
        prev_sc = np.concatenate([st.prev_score[None], sc_blk[:-1]])[:, :, :dc]
        entries = pool(np.concatenate([prev_kv, kv_blk[:, :, dc:]], axis=1),
                       np.concatenate([prev_sc, sc_blk[:, :, dc:]], axis=1))
    else:
        entries = pool(kv_blk, sc_blk)                     # [n, Dc]
    # hand the unfinished block (and the last complete one) to the next call
    rest = (r0 + S) - n_done * m
    if n_done:
        if w.overlap:
            st.prev_kv[:] = kv_blk[-1]
            st.prev_score[:] = sc_blk[-1]
            st.has_prev = True
        st.kv[:] = 0
        st.score[:] = -np.inf
    st.kv[:rest] = kv_all[n_done * m:]
    st.score[:rest] = sc_all[n_done * m:]
    return first, entries


def finish_entries(w: CompressorW, entries: np.ndarray, first: int, rope: Rope,
                   eps: float, be) -> np.ndarray:
    """Norm and RoPE (at each block's first position) of pooled entries [n, Dc]."""
    if entries.shape[0] == 0:
        return entries
    kv = be.rmsnorm(entries, w.norm, eps, round_input=True)            # [n, Dc]
    positions = (first + np.arange(entries.shape[0])) * w.ratio
    return be.rope(kv[:, None], positions, rope)[:, 0]
