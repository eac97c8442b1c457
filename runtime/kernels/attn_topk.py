"""O(T) top-k selection by radix select on order-preserving integer keys.

The selected SET equals that of `np.argsort(-scores, kind="stable")[:k]` (nn.topk_desc):
larger scores first, ties toward the lower index, -0.0 equal to 0.0, NaN below -inf (numpy
sorts NaN last). The output lists the selected indices in ASCENDING INDEX order, not in
score order.

Method: each float32 maps to a uint32 key that orders like the float (NaN -> 0, the smallest).
Three histogram passes over 11/11/10 key bits (top first; after the first pass only the
candidates sharing the boundary prefix are kept) find the k-th largest key v and how many
entries equal to v are needed; one final pass in index order emits every key > v and the
first `need` keys == v. Histograms are split 4 ways by index to avoid store-forwarding
stalls when many scores share a bin (bf16 scores tie often). Shortcuts: a row whose visible
entries are all selected (and not NaN) is copied; rows of at most _SMALL entries use a stable
sort of the keys instead of the histograms.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attn_util import U32, f32_as_u32, jit_opts

_KEY_NEG_INF = 0x007FFFFF       # key of -inf: ~0xFF800000
_SMALL = 256                    # rows up to this length are sorted instead


@njit(**jit_opts(fastmath=False), inline="always")
def _key(x):
    """float32 -> uint32 with the float order; -0.0 and 0.0 share a key, NaN -> 0."""
    u = f32_as_u32(x)
    a = U32(u & U32(0x7FFFFFFF))
    u = U32(0) if a == U32(0) else u
    k = U32(~u) if (u >> U32(31)) == U32(1) else U32(u | U32(0x80000000))
    return U32(0) if a > U32(0x7F800000) else k


@njit(**jit_opts(fastmath=False))
def _boundary(hist, nbins, need):
    """Scan bins from the top; return (bin holding the need-th largest, need within it)."""
    b = nbins - 1
    while b > 0:
        c = hist[b] + hist[nbins + b] + hist[2 * nbins + b] + hist[3 * nbins + b]
        if c >= need:
            break
        need -= c
        b -= 1
    return b, need


@njit(**jit_opts(fastmath=False))
def _select_row(scores, nv, T, k, out):
    """out[:kk] = the kk = min(k, nv) largest of the row masked beyond nv with -inf, ascending
    index; out[kk:] = -1. Entries t >= nv (up to T) take part as -inf (they can only be
    chosen when NaNs are visible, as in the reference)."""
    kk = min(k, nv)
    for i in range(kk, out.size):
        out[i] = -1
    if kk <= 0:
        return
    if kk >= T:                                   # everything selected
        for i in range(kk):
            out[i] = i
        return
    keys = np.empty(nv, np.uint32)
    n_nan = 0
    for t in range(nv):
        x = _key(scores[t])
        keys[t] = x
        n_nan += x == U32(0)
    if kk == nv and n_nan == 0:                   # every visible entry, nothing else
        for i in range(kk):
            out[i] = i
        return
    if nv <= _SMALL:                              # short rows: a stable sort of the keys
        order = np.argsort(~keys, kind="mergesort")
        sel = np.sort(order[:kk])
        n_virtual = T - nv
        n_top = nv - n_nan                        # non-NaN visible entries rank first
        if kk <= n_top or n_virtual == 0:
            for i in range(kk):
                out[i] = sel[i]
            return
    n_virtual = T - nv                             # implicit -inf entries after nv
    vkey = U32(_KEY_NEG_INF)
    # level 1: bits 31..21
    hist = np.zeros(4 * 2048, np.int32)
    for t in range(nv):
        hist[(t & 3) * 2048 + np.int64(keys[t] >> U32(21))] += 1
    hist[np.int64(vkey >> U32(21))] += np.int32(n_virtual)
    b1, need = _boundary(hist, 2048, kk)
    cand = np.empty(nv, np.uint32)
    nc = 0
    for t in range(nv):
        if np.int64(keys[t] >> U32(21)) == b1:
            cand[nc] = keys[t]
            nc += 1
    v_in = np.int64(vkey >> U32(21)) == b1
    # level 2: bits 20..10
    hist[:] = 0
    for i in range(nc):
        hist[(i & 3) * 2048 + np.int64((cand[i] >> U32(10)) & U32(2047))] += 1
    if v_in:
        hist[np.int64((vkey >> U32(10)) & U32(2047))] += np.int32(n_virtual)
    b2, need = _boundary(hist, 2048, need)
    m = 0
    for i in range(nc):
        if np.int64((cand[i] >> U32(10)) & U32(2047)) == b2:
            cand[m] = cand[i]
            m += 1
    v_in = v_in and np.int64((vkey >> U32(10)) & U32(2047)) == b2
    # level 3: bits 9..0
    hist[:] = 0
    for i in range(m):
        hist[(i & 3) * 1024 + np.int64(cand[i] & U32(1023))] += 1
    if v_in:
        hist[np.int64(vkey & U32(1023))] += np.int32(n_virtual)
    b3, need = _boundary(hist, 1024, need)
    v = U32((b1 << 21) | (b2 << 10) | b3)
    # emit in index order: keys > v, then the first `need` keys == v
    n = 0
    for t in range(nv):
        x = keys[t]
        if x > v:
            out[n] = t
            n += 1
        elif x == v and need > 0:
            out[n] = t
            n += 1
            need -= 1
    if vkey >= v:
        for t in range(nv, T):
            if n >= kk or (vkey == v and need <= 0):
                break
            out[n] = t
            n += 1
            if vkey == v:
                need -= 1


@njit(**jit_opts(fastmath=False))
def topk_into(scores, k, out):
    """scores f32[T] -> out int64[min(k, T)]: the k largest, ascending index."""
    T = scores.shape[0]
    _select_row(scores, T, T, k, out)


@njit(**jit_opts(parallel=True, fastmath=False))
def topk_rows_into(scores, n_visible, k, out):
    """scores f32[S, T], n_visible int64[S] (0 <= n_visible <= T), out int64[S, min(k, T)]:
    row s holds the min(k, n_visible[s]) largest of scores[s, :n_visible[s]] (ascending
    index), then -1."""
    S, T = scores.shape
    for s in prange(S):
        _select_row(scores[s], n_visible[s], T, k, out[s])
