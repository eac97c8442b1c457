"""Fast attention-side kernels (Numba): KV row encode/decode, sparse attention with sink, indexer
scores over the FP4 key cache, O(T) top-k. Thin checked wrappers over the njit kernels of
attn_kv / attn_sparse / attn_index / attn_topk; each matches the NumPy reference named in
its docstring (runtime/backend.py RefBackend, runtime/nn.py, runtime/attention/indexer.py).

Small per-call inputs (q, qi, wt, sink, idx, rows) are converted to the kernel dtype and made
contiguous; cache arrays (kv, codes, packed, ...) must already have the store's dtype and be
C-contiguous (no silent copies of big arrays). Parallel kernels run one prange region per
call on Numba's current thread count.
"""
from __future__ import annotations

import numba
import numpy as np

from ..kv_cache import Bf16Store, F32Store, Fp4KeyStore, Fp8KVStore
from .aligned import aligned_copy, aligned_empty
from .attn_index import index_scores_for
from .attn_kv import (read_kv_bf16_into, read_kv_f32_into, read_kv_fp8_into, write_kv_bf16_into,
                      write_kv_bf16_par, write_kv_fp4_into, write_kv_fp4_par, write_kv_fp8_into,
                      write_kv_fp8_par)
from .attn_decode import attend_keys
from .attn_sparse import sparse_attn_into
from .attn_topk import topk_into, topk_rows_into

_NO_ROPE = np.empty(0, np.float32)   # attend_keys' cos, sin when it does not rotate
PARALLEL_ROWS = 64          # KV rows written per call from which the write runs in parallel

__all__ = ["aligned_empty", "read_kv_fp8", "read_kv_bf16", "read_kv_f32", "read_kv", "write_kv",
           "sparse_attn", "index_scores_fp4", "index_scores_f32", "index_scores", "topk_indices",
           "topk_rows", "select_rows"]


def _arr(x, dtype, name, ndim):
    if not isinstance(x, np.ndarray) or x.dtype != dtype or x.ndim != ndim:
        got = f"{x.dtype}{list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name}: expected a {ndim}-d {np.dtype(dtype).name} array, got {got}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    return x


def _rows(rows, n_rows, name="rows"):
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"{name}: values must lie in [0, {n_rows}), got "
                         f"[{rows.min()}, {rows.max()}]")
    return rows


def _out(out, shape, dtype=np.float32):
    if out is None:
        return aligned_empty(shape, dtype)
    _arr(out, dtype, "out", len(shape))
    if out.shape != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    return out


# ------------------------------------------------------------------ KV rows
def _fp8_store_dims(codes, exps, rope, block: int) -> tuple[int, int]:
    """Check the arrays of an Fp8KVStore -> (rows R, nope dims N)."""
    _arr(codes, np.uint8, "codes", 2)
    _arr(exps, np.int8, "exps", 2)
    _arr(rope, np.uint16, "rope", 2)
    R, N = codes.shape
    if exps.shape != (R, -(-N // block)) or rope.shape[0] != R:
        raise ValueError(f"KV store arrays disagree: codes {codes.shape}, exps {exps.shape}, "
                         f"rope {rope.shape}, block {block}")
    return R, N


def read_kv_fp8(codes, exps, rope, rows, block: int = 64, out=None) -> np.ndarray:
    """Fp8KVStore rows -> f32[n, N + Rd], bit-identical to Fp8KVStore.read(rows)."""
    R, N = _fp8_store_dims(codes, exps, rope, block)
    rows = _rows(rows, R)
    out = _out(out, (rows.size, N + rope.shape[1]))
    read_kv_fp8_into(codes, exps, rope, rows, block, out)
    return out


def read_kv_bf16(data, rows, out=None) -> np.ndarray:
    """Bf16Store rows (uint16 bf16 bits [R, D]) -> f32[n, D], exact."""
    _arr(data, np.uint16, "data", 2)
    rows = _rows(rows, data.shape[0])
    out = _out(out, (rows.size, data.shape[1]))
    read_kv_bf16_into(data, rows, out)
    return out


def read_kv_f32(data, rows, out=None) -> np.ndarray:
    """F32Store rows -> f32[n, D] (a gather)."""
    _arr(data, np.float32, "data", 2)
    rows = _rows(rows, data.shape[0])
    out = _out(out, (rows.size, data.shape[1]))
    read_kv_f32_into(data, rows, out)
    return out


def read_kv(store, rows, out=None) -> np.ndarray:
    """RefBackend.read_kv for the stores of kv_cache.py (rows: int array or slice); `out`
    may be a row slice of a bigger (aligned) buffer."""
    if isinstance(rows, slice):
        n = store.codes.shape[0] if isinstance(store, Fp8KVStore) else store.data.shape[0]
        rows = np.arange(n)[rows]
    if isinstance(store, Fp8KVStore):
        return read_kv_fp8(store.codes, store.exps, store.rope, rows, store.block, out)
    if isinstance(store, Bf16Store):
        return read_kv_bf16(store.data, rows, out)
    if isinstance(store, F32Store):
        return read_kv_f32(store.data, rows, out)
    raise TypeError(f"read_kv: unsupported store {type(store).__name__}")


def _write_args(rows, x, n_rows, dim):
    """rows (slice or ints) -> int64[n], x -> contiguous f32[n, dim], parallel flag."""
    rows = np.arange(n_rows)[rows] if isinstance(rows, slice) else _rows(rows, n_rows)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (rows.size, dim):
        raise ValueError(f"x: expected shape {(rows.size, dim)} for {rows.size} rows of a "
                         f"{dim}-wide store, got {x.shape}")
    par = rows.size >= PARALLEL_ROWS and np.unique(rows).size == rows.size
    return rows, x, par


def write_kv(store, rows, x) -> None:
    """RefBackend.write_kv: store.write(rows, x) for the stores of kv_cache.py, bit-identical,
    in place (rows: int array or slice; x [n, D]). Other stores: their own write."""
    if isinstance(store, Fp8KVStore):
        codes, exps, rope, block = store.codes, store.exps, store.rope, store.block
        R, N = _fp8_store_dims(codes, exps, rope, block)
        rows, x, par = _write_args(rows, x, R, N + rope.shape[1])
        (write_kv_fp8_par if par else write_kv_fp8_into)(x, rows, block, codes, exps, rope)
    elif isinstance(store, Fp4KeyStore):
        packed, exps, block = store.packed, store.exps, store.block
        _arr(packed, np.uint8, "packed", 2)
        _arr(exps, np.int8, "exps", 2)
        R, D = packed.shape[0], 2 * packed.shape[1]
        if block % 2 or exps.shape != (R, D // block) or D % block:
            raise ValueError(f"key store arrays disagree: packed {packed.shape}, exps "
                             f"{exps.shape}, block {block}")
        rows, x, par = _write_args(rows, x, R, D)
        (write_kv_fp4_par if par else write_kv_fp4_into)(x, rows, block, packed, exps)
    elif isinstance(store, Bf16Store):
        _arr(store.data, np.uint16, "data", 2)
        rows, x, par = _write_args(rows, x, *store.data.shape)
        (write_kv_bf16_par if par else write_kv_bf16_into)(x, rows, store.data)
    elif isinstance(store, F32Store):
        _arr(store.data, np.float32, "data", 2)
        rows, x, _ = _write_args(rows, x, *store.data.shape)
        store.data[rows] = x                      # a plain copy
    else:
        store.write(rows, x)


# ------------------------------------------------------------------ attention
def sparse_attn(q, kv, idx, sink, scale: float, out=None, heads_per_item: int | None = None,
                variant: str | None = None):
    """RefBackend.sparse_attn: q f32[S, H, D], kv f32[T, D] (keys = values), idx int[S, K]
    rows of kv (-1 = none; duplicates count twice), sink f32[H] -> f32[S, H, D]. A query
    with no valid key gets zeros. `heads_per_item`: heads per parallel work item. Build kv
    in an aligned_empty buffer (e.g. read_kv(..., out=buf[a:b]) per part) for full speed.
    `variant` (a gemv kernel variant) and S = 1: the query's valid keys are gathered and
    attended by attn_decode.attend_keys of that variant (the decode step's kernel, bit for
    bit)."""
    q = aligned_copy(np.ascontiguousarray(q, dtype=np.float32))
    if q.ndim != 3:
        raise ValueError(f"q: expected [S, H, D], got shape {q.shape}")
    _arr(kv, np.float32, "kv", 2)
    S, H, D = q.shape
    if kv.shape[1] != D:
        raise ValueError(f"kv: expected {D} columns, got {kv.shape[1]}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != S:
        raise ValueError(f"idx: expected shape [{S}, K], got {idx.shape}")
    if idx.size and idx.max() >= kv.shape[0]:
        raise IndexError(f"idx: values must be < {kv.shape[0]} (rows of kv), got {idx.max()}")
    sink = np.ascontiguousarray(sink, dtype=np.float32).reshape(-1)
    if sink.size != H:
        raise ValueError(f"sink: expected {H} values, got {sink.size}")
    out = _out(out, (S, H, D))
    if variant is not None and S == 1:
        rows = idx[0][idx[0] >= 0]
        keys = aligned_empty((rows.size, D))
        np.take(kv, rows, axis=0, out=keys)
        attend_keys(variant)(q[0], keys, sink, np.float32(scale), numba.get_num_threads(), out[0], _NO_ROPE,
                             _NO_ROPE, False)
        return out
    if heads_per_item is None:               # >= 2 items per thread: split the heads
        heads_per_item = max(2, H * S // (2 * numba.get_num_threads()))
    hb = max(1, min(int(heads_per_item), H))
    if hb < H and hb % 2:
        hb += 1                                  # the kernel works on pairs of heads
    sparse_attn_into(q, kv, idx, sink, np.float32(scale), hb, out)
    return out


# ------------------------------------------------------------------ indexer
def _query_block(S: int, T: int) -> int:
    """Queries per work item: up to 8 (one key-tile decode serves them), while keeping at
    least 4 items per thread."""
    tiles, want = -(-T // 128), 4 * numba.get_num_threads()
    for sb in (8, 4, 2):
        if tiles * -(-S // sb) >= want:
            return sb
    return 1


def _index_args(qi, wt, T, n_rows):
    if qi.ndim != 3:
        raise ValueError(f"qi: expected [S, Ih, Id], got shape {qi.shape}")
    S, Ih, Id = qi.shape
    if wt.shape != (S, Ih):
        raise ValueError(f"wt: expected shape {(S, Ih)}, got {wt.shape}")
    if Id % 32:
        raise ValueError(f"qi: head dim must be a multiple of 32, got {Id}")
    if not 0 <= T <= n_rows:
        raise ValueError(f"T={T} must lie in [0, {n_rows}] (rows of the key cache)")
    return S, Id


def index_scores_fp4(qi, wt, packed, exps, T: int, round_bf16: bool = True, out=None, variant: str = "numba"):
    """RefBackend.index_scores over an Fp4KeyStore (packed u8[Rows, Id/2], exps i8[Rows,
    Id/32]) -> f32[S, T]. Bit-identical to the reference when qi is FP4-rounded. `variant`:
    the gemv kernel variant whose tile products to use (attn_index.index_scores_for)."""
    _arr(packed, np.uint8, "packed", 2)
    _arr(exps, np.int8, "exps", 2)
    qi, wt = np.ascontiguousarray(qi, np.float32), np.ascontiguousarray(wt, np.float32)
    S, Id = _index_args(qi, wt, T, packed.shape[0])
    if packed.shape[1] * 2 != Id or exps.shape != (packed.shape[0], Id // 32):
        raise ValueError(f"key cache {packed.shape}/{exps.shape} does not fit head dim {Id}")
    out = _out(out, (S, T))
    if S and T:
        index_scores_for(variant)(qi, wt, packed, exps, np.empty((0, Id), np.float32), T,
                          bool(round_bf16), _query_block(S, T), out)
    return out


def index_scores_f32(qi, wt, keys, T: int, round_bf16: bool = False, out=None, variant: str = "numba"):
    """RefBackend.index_scores over float32 keys [Rows, Id] (F32Store) -> f32[S, T]."""
    _arr(keys, np.float32, "keys", 2)
    qi, wt = np.ascontiguousarray(qi, np.float32), np.ascontiguousarray(wt, np.float32)
    S, Id = _index_args(qi, wt, T, keys.shape[0])
    if keys.shape[1] != Id:
        raise ValueError(f"keys: expected {Id} columns, got {keys.shape[1]}")
    out = _out(out, (S, T))
    if S and T:
        index_scores_for(variant)(qi, wt, np.empty((0, Id // 2), np.uint8),
                          np.empty((0, Id // 32), np.int8), keys, T, bool(round_bf16),
                          _query_block(S, T), out)
    return out


def index_scores(qi, wt, store, T: int, round_bf16: bool, variant: str = "numba") -> np.ndarray:
    """RefBackend.index_scores for an Fp4KeyStore or F32Store (round_bf16 = not exact)."""
    if isinstance(store, Fp4KeyStore):
        return index_scores_fp4(qi, wt, store.packed, store.exps, T, round_bf16, variant=variant)
    if isinstance(store, F32Store) and store.data.dtype == np.float32:
        return index_scores_f32(qi, wt, store.data, T, round_bf16, variant=variant)
    raise TypeError(f"index_scores: unsupported key store {type(store).__name__}")


# ------------------------------------------------------------------ top-k
def topk_indices(scores, k: int) -> np.ndarray:
    """Same SET as nn.topk_desc(scores, k) (k largest, ties to the lower index, NaN last),
    listed in ascending index order -> int64[min(k, T)]."""
    scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    out = np.empty(max(0, min(int(k), scores.size)), np.int64)
    if out.size:
        topk_into(scores, out.size, out)
    return out


def topk_rows(scores, n_visible, k: int) -> np.ndarray:
    """Per row s: the min(k, n_visible[s]) largest of scores[s, :n_visible[s]] (entries past
    n_visible count as -inf, ties to the lower index), ascending index, then -1 ->
    int64[S, min(k, T)]."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores: expected [S, T], got shape {scores.shape}")
    S, T = scores.shape
    nv = np.clip(np.asarray(n_visible, dtype=np.int64).reshape(-1), 0, T)
    if nv.size != S:
        raise ValueError(f"n_visible: expected {S} values, got {nv.size}")
    out = np.empty((S, max(0, min(int(k), T))), np.int64)
    if out.size:
        topk_rows_into(scores, np.ascontiguousarray(nv), out.shape[1], out)
    return out


def select_rows(scores, positions, ratio: int, topk: int) -> np.ndarray:
    """indexer.select: entry t is visible to the query at position p iff t < (p+1)//ratio;
    same selected sets (order: ascending index, surplus slots -1 at the end)."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    return topk_rows(scores, (positions + 1) // ratio, topk)
