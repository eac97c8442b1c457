"""The matrix products of decode attention and of the indexer, as register-blocked IR
kernels (linked into both ISA modules; drivers: attn_decode.py, attn_index.py). All
float32, rows `ld*` floats apart:

- `dsv4_{isa}_attn_scores(q, k, s, nh, nk, D, ldq, ldk, lds)`: s[h, j] = q[h] . k[j] for
  h < nh, j < nk. A block of HB heads x KB keys keeps HB*KB vector accumulators over d
  (HB + KB loads per HB*KB FMAs); at the end a tree of shuffles sums the W lanes of all W
  accumulators at once into one vector, lane i*KB + c holding (head i, key c).
- `dsv4_{isa}_attn_wsum(p, k, o, nh, nk, D, ldp, ldk, ldo)`: o[h, :] = sum_j p[h, j] k[j, :]
  (o overwritten). A block of HB heads x VB vectors of d keeps HB*VB accumulators over all
  keys (VB loads and HB broadcasts per HB*VB FMAs): no partial sums go through memory.
- `dsv4_{isa}_index_tile(q, kT, part, nh, Id, tb)`: the indexer's per-32-dim block sums
  for a tile of keys stored transposed (see _index_tile).

avx512: W = 16, scores 4 x 4, wsum 4 heads x 4 vectors (16 accumulators); avx2: W = 8,
scores 2 x 4, wsum 4 x 2 (8 accumulators, within the 16 ymm registers). Heads past nh and
keys past nk in a last block repeat the last row (their results are the same numbers,
stored to the same places); a d tail that does not fill a vector is read and written with
masks. Each (h, j) score and each o element is a sum in a fixed order that does not depend
on the block it falls in, so splitting the heads over threads does not change a bit.
"""
from __future__ import annotations

from .irgen import Fn, branch, counted_loop, mask_first

SHAPES = {"avx512": (16, (4, 4), (4, 4)), "avx2": (8, (2, 4), (4, 2))}   # W, scores HBxKB, wsum HBxVB
PARAMS = {f"dsv4_{isa}_attn_{k}": "pppiiiiii" for isa in SHAPES for k in ("scores", "wsum")}
PARAMS |= {f"dsv4_{isa}_index_tile": "pppiii" for isa in SHAPES}
INDEX_BLOCK = 32           # dims per partial sum of the indexer (its FP4 scale block)


def _decls(W: int) -> str:
    V = f"<{W} x float>"
    return (f"declare {V} @llvm.masked.load.v{W}f32.p0(ptr, i32, <{W} x i1>, {V})\n"
            f"declare void @llvm.masked.store.v{W}f32.p0({V}, ptr, i32, <{W} x i1>)")


def _fma(f: Fn, V: str, a: str, b: str, c: str) -> str:
    """a * b + c, contracted to one FMA by the backend."""
    return f(f"fadd contract {V} {c}, {f(f'fmul contract {V} {a}, {b}')}")


def _row(f: Fn, base: str, idx: str, last: str, ld: str) -> str:
    """Pointer to row min(idx, last) of a float matrix with rows ld floats apart."""
    r = f(f"select i1 {f(f'icmp slt i64 {idx}, {last}')}, i64 {idx}, i64 {last}")
    return f.gep("float", base, f(f"mul i64 {r}, {ld}"))


def _tree_sum(f: Fn, V: str, W: int, accs: list[str]) -> str:
    """W vectors of W lanes -> one vector whose lane i is the sum of accs[i]'s lanes: at each
    level, pairs (a, b) of vectors made of segments of g lanes become a + b taken as the first
    halves of every segment of a then of b, and the second halves likewise."""
    g = W
    while len(accs) > 1:
        h = g // 2
        lo = [s + t for s in range(0, W, g) for t in range(h)]
        first = lo + [W + i for i in lo]
        second = [i + h for i in first]
        nxt = []
        for a, b in zip(accs[0::2], accs[1::2]):
            x = f(f"shufflevector {V} {a}, {V} {b}, <{W} x i32> <{', '.join(f'i32 {i}' for i in first)}>")
            y = f(f"shufflevector {V} {a}, {V} {b}, <{W} x i32> <{', '.join(f'i32 {i}' for i in second)}>")
            nxt.append(f(f"fadd {V} {x}, {y}"))
        accs, g = nxt, h
    return accs[0]


def _scores(isa: str) -> str:
    W, (HB, KB), _ = SHAPES[isa]
    V = f"<{W} x float>"
    f = Fn(f"define void @dsv4_{isa}_attn_scores(ptr noalias %q, ptr noalias %k, ptr noalias %s, i64 %nh, i64 %nk, "
           "i64 %D, i64 %ldq, i64 %ldk, i64 %lds)")
    nv = f(f"udiv i64 %D, {W}")
    tail = f(f"urem i64 %D, {W}")
    has_tail = f("icmp ne i64 " + tail + ", 0")
    tmask = mask_first(f, W, tail)
    dt = f(f"mul i64 {nv}, {W}")
    hlast, klast = f("sub i64 %nh, 1"), f("sub i64 %nk, 1")
    nhb = f(f"udiv i64 {f(f'add i64 %nh, {HB - 1}')}, {HB}")
    nkb = f(f"udiv i64 {f(f'add i64 %nk, {KB - 1}')}, {KB}")
    zero = "zeroinitializer"

    def head_block(f, hb, _):
        h0 = f(f"mul i64 {hb}, {HB}")
        hs = [f(f"add i64 {h0}, {i}") for i in range(HB)]
        qs = [_row(f, "%q", h, hlast, "%ldq") for h in hs]

        def key_block(f, kb, _):
            j0 = f(f"mul i64 {kb}, {KB}")
            ks = [_row(f, "%k", f(f"add i64 {j0}, {c}"), klast, "%ldk") for c in range(KB)]

            def step(f, v, accs, load=None):
                d = f(f"mul i64 {v}, {W}")
                ld = load or (lambda p: f(f"load {V}, ptr {f.gep('float', p, d)}, align 4"))
                qv = [ld(p) for p in qs]
                kv = [ld(p) for p in ks]
                return [_fma(f, V, qv[i], kv[c], accs[i * KB + c]) for i in range(HB) for c in range(KB)]
            accs = counted_loop(f, nv, step, [(V, zero)] * (HB * KB), f"sd{f.new()[2:]}")

            def masked(f):
                ld = (lambda p: f.masked_load(V, f.gep("float", p, dt), tmask, zero, 4))
                return step(f, nv, accs, ld)
            pre = f.block
            tag = f.new()[2:]
            f.cbr(has_tail, f"%st{tag}", f"%sj{tag}")
            f.label(f"st{tag}")
            tl = masked(f)
            tb = f.block
            f.br(f"%sj{tag}")
            f.label(f"sj{tag}")
            accs = [f.merge(V, [(a, pre), (t, tb)]) for a, t in zip(accs, tl)]
            sums = _tree_sum(f, V, W, accs)                 # lane i*KB + c: head i, key c
            def whole(f):                                   # KB keys: one store per head
                for i, h in enumerate(hs):
                    part = f(f"shufflevector {V} {sums}, {V} poison, <{KB} x i32> "
                             f"<{', '.join(f'i32 {i * KB + c}' for c in range(KB))}>")
                    row = _row(f, "%s", h, hlast, "%lds")
                    f.put(f"store <{KB} x float> {part}, ptr {f.gep('float', row, j0)}, align 4")

            def last(f):                                    # the last keys one by one
                for i, h in enumerate(hs):
                    row = _row(f, "%s", h, hlast, "%lds")
                    for c in range(KB):
                        j = f(f"add i64 {j0}, {c}")
                        jc = f(f"select i1 {f(f'icmp slt i64 {j}, %nk')}, i64 {j}, i64 {klast}")
                        val = f(f"extractelement {V} {sums}, i64 {i * KB + c}")   # clamped: key nk-1's
                        f.put(f"store float {val}, ptr {f.gep('float', row, jc)}, align 4")
            branch(f, f(f"icmp sle i64 {f(f'add i64 {j0}, {KB}')}, %nk"), whole, last)
            return []
        counted_loop(f, nkb, key_block, [], f"kb{f.new()[2:]}")
        return []
    counted_loop(f, nhb, head_block, [], "hb")
    f.put("ret void")
    return f.end()


def _wsum(isa: str) -> str:
    W, _, (HB, VB) = SHAPES[isa]
    V = f"<{W} x float>"
    f = Fn(f"define void @dsv4_{isa}_attn_wsum(ptr noalias %p, ptr noalias %k, ptr noalias %o, i64 %nh, i64 %nk, "
           "i64 %D, i64 %ldp, i64 %ldk, i64 %ldo)")
    span = W * VB
    ndb = f(f"udiv i64 {f(f'add i64 %D, {span - 1}')}, {span}")
    hlast = f("sub i64 %nh, 1")
    nhb = f(f"udiv i64 {f(f'add i64 %nh, {HB - 1}')}, {HB}")
    zero = "zeroinitializer"

    def d_block(f, db, _):
        d0 = f(f"mul i64 {db}, {span}")
        full = f(f"icmp sle i64 {f(f'add i64 {d0}, {span}')}, %D")
        offs = [f(f"add i64 {d0}, {v * W}") for v in range(VB)]
        rems = [f(f"sub i64 %D, {o}") for o in offs]                # may be <= 0 in the tail
        masks = [mask_first(f, W, f(f"select i1 {f(f'icmp sgt i64 {r}, 0')}, i64 {r}, i64 0")) for r in rems]

        def head_block(f, hb, _):
            h0 = f(f"mul i64 {hb}, {HB}")
            hs = [f(f"add i64 {h0}, {i}") for i in range(HB)]
            ps = [_row(f, "%p", h, hlast, "%ldp") for h in hs]

            def run(f, masked: bool):
                def step(f, j, accs):
                    krow = f.gep("float", "%k", f(f"mul i64 {j}, %ldk"))
                    kv = []
                    for v in range(VB):
                        ptr = f.gep("float", krow, offs[v])
                        kv.append(f.masked_load(V, ptr, masks[v], zero, 4) if masked
                                  else f(f"load {V}, ptr {ptr}, align 4"))
                    out = []
                    for i in range(HB):
                        pj = f(f"load float, ptr {f.gep('float', ps[i], j)}, align 4")
                        pb = f.splat("float", W, pj)
                        out += [_fma(f, V, pb, kv[v], accs[i * VB + v]) for v in range(VB)]
                    return out
                accs = counted_loop(f, "%nk", step, [(V, zero)] * (HB * VB), f"wj{f.new()[2:]}")
                for i, h in enumerate(hs):
                    orow = _row(f, "%o", h, hlast, "%ldo")
                    for v in range(VB):
                        ptr = f.gep("float", orow, offs[v])
                        if masked:
                            f.put(f"call void @llvm.masked.store.v{W}f32.p0({V} {accs[i * VB + v]}, ptr {ptr}, "
                                  f"i32 4, <{W} x i1> {masks[v]})")
                        else:
                            f.put(f"store {V} {accs[i * VB + v]}, ptr {ptr}, align 4")
            branch(f, full, lambda f: run(f, False), lambda f: run(f, True))
            return []
        counted_loop(f, nhb, head_block, [], f"hb{f.new()[2:]}")
        return []
    counted_loop(f, ndb, d_block, [], "db")
    f.put("ret void")
    return f.end()


def _index_tile(isa: str) -> str:
    """dsv4_{isa}_index_tile(q, kT, part, nh, Id, tb): the indexer's block sums for one tile
    of tb keys stored transposed (kT[d * tb + j]): part[(b * nh + h) * tb + j] =
    sum over d in block b (INDEX_BLOCK dims, in order) of q[h * Id + d] * kT[d * tb + j].
    Id a multiple of INDEX_BLOCK, tb a multiple of VB * W. Blocks of HB heads x VB vectors of
    keys, as wsum: VB loads and HB broadcasts per HB * VB FMAs."""
    W, _, (HB, VB) = SHAPES[isa]
    V = f"<{W} x float>"
    f = Fn(f"define void @dsv4_{isa}_index_tile(ptr noalias %q, ptr noalias %kT, ptr noalias %part, i64 %nh, "
           "i64 %Id, i64 %tb)")
    nb = f(f"udiv i64 %Id, {INDEX_BLOCK}")
    hlast = f("sub i64 %nh, 1")
    nhb = f(f"udiv i64 {f(f'add i64 %nh, {HB - 1}')}, {HB}")
    njb = f(f"udiv i64 %tb, {VB * W}")

    def block(f, b, _):
        d0 = f(f"mul i64 {b}, {INDEX_BLOCK}")

        def head_block(f, hb, _):
            hs = [f(f"add i64 {f(f'mul i64 {hb}, {HB}')}, {i}") for i in range(HB)]
            qs = [f.gep("float", _row(f, "%q", h, hlast, "%Id"), d0) for h in hs]

            def key_block(f, jb, _):
                j0 = f(f"mul i64 {jb}, {VB * W}")

                def step(f, d, accs):
                    dd = f(f"add i64 {d0}, {d}")
                    krow = f.gep("float", "%kT", f(f"add i64 {f(f'mul i64 {dd}, %tb')}, {j0}"))
                    kv = [f(f"load {V}, ptr {f.gep('float', krow, v * W)}, align 4") for v in range(VB)]
                    out = []
                    for i in range(HB):
                        qd = f(f"load float, ptr {f.gep('float', qs[i], d)}, align 4")
                        qb = f.splat("float", W, qd)
                        out += [_fma(f, V, qb, kv[v], accs[i * VB + v]) for v in range(VB)]
                    return out
                accs = counted_loop(f, str(INDEX_BLOCK), step, [(V, "zeroinitializer")] * (HB * VB),
                                    f"id{f.new()[2:]}")
                for i, h in enumerate(hs):
                    hc = f(f"select i1 {f(f'icmp slt i64 {h}, %nh')}, i64 {h}, i64 {hlast}")
                    bh = f(f"add i64 {f(f'mul i64 {b}, %nh')}, {hc}")
                    prow = f.gep("float", "%part", f(f"mul i64 {bh}, %tb"))
                    for v in range(VB):
                        ptr = f.gep("float", prow, f(f"add i64 {j0}, {v * W}"))
                        f.put(f"store {V} {accs[i * VB + v]}, ptr {ptr}, align 4")
                return []
            counted_loop(f, njb, key_block, [], f"ij{f.new()[2:]}")
            return []
        counted_loop(f, nhb, head_block, [], f"ih{f.new()[2:]}")
        return []
    counted_loop(f, nb, block, [], "ib")
    f.put("ret void")
    return f.end()


def functions(isa: str) -> list[str]:
    """The declarations and the kernels for the module of `isa` ('avx512' or 'avx2')."""
    return [_decls(SHAPES[isa][0]), _scores(isa), _wsum(isa), _index_tile(isa)]
