"""Fast gemv kernels and FP8 activation quantization against the NumPy references.

Every variant the host supports runs (numba, avx2, avx512), on odd shapes, with x both
arbitrary (exact mode) and e4m3-quantized (default mode), on plain arrays and on read-only,
unaligned memory maps. Error bound: |y - ref| <= 1e-5 * (|W| @ |x|) per row.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from dsv4.quant.blocks import act_quant_values as ref_act_quant_values
from dsv4.quant.blocks import dequant_fp4_weight
from dsv4.runtime.kernels import cpu, gemv, ir
from dsv4.runtime.kernels.actq import act_quant_values, quant_row
from dsv4.runtime.kernels.prep import bf16_terms
from dsv4.runtime.kernels.selfcheck import TOL, problem, worst

VARIANTS = [v for v in cpu.VARIANTS if not cpu.unmet(v, cpu.host_features())]
SHAPES = {  # fmt -> [(O, K, block)]
    "fp4": [(7, 32, None), (13, 96, None), (37, 2080, None)],
    "fp8": [(131, 200, (128, 128)), (45, 100, (32, 48)), (9, 4096, (128, 128)), (10, 424, (128, 128))],
    "bf16": [(5, 37, None), (33, 1000, None)],
    "f32": [(5, 37, None), (9, 515, None)],
}
CASES = [(f, *s) for f, shapes in SHAPES.items() for s in shapes]


def _x(kind: str, K: int, rng) -> np.ndarray:
    x = (rng.standard_normal(K) * np.exp(rng.uniform(-3, 3, K))).astype(np.float32)
    return ref_act_quant_values(x[None], 128)[0] if kind == "quantized" else x


def _memmap(tmp_path, arrays, offset=11):
    """Write arrays back to back after `offset` bytes and map them read-only (unaligned)."""
    path = tmp_path / "blob.bin"
    with open(path, "wb") as fh:
        fh.write(b"\x00" * offset)
        for a in arrays:
            if a is not None:
                fh.write(np.ascontiguousarray(a).tobytes())
    out, pos = [], offset
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        out.append(np.memmap(path, dtype=a.dtype, mode="r", offset=pos, shape=a.shape))
        pos += a.nbytes
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,O,K,block", CASES)
@pytest.mark.parametrize("xkind", ["exact", "quantized"])
def test_gemv_matches_reference(variant, fmt, O, K, block, xkind, rng):
    blk = block or (128, 128)
    W, S, Wr = problem(fmt, rng, O, K, blk)
    k = gemv.Kernels(variant)
    x = _x(xkind, K, rng)
    y = k.gemv(fmt, W, S, k.prepare_x(fmt, x, blk[1]), blk)
    assert y.shape == (O,) and y.dtype == np.float32
    assert worst(y, Wr, x) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", list(SHAPES))
def test_batched_memmapped(variant, fmt, tmp_path, rng):
    """One call, many jobs: different shapes in one table, repeated matrices, per-job x rows;
    weights read-only and at odd byte offsets."""
    shapes = [(O, K) for O, K, _ in SHAPES[fmt][:2]]
    K = shapes[0][1]
    shapes = [(O, K) for O, _ in shapes] + [(3, K)]
    blk = SHAPES[fmt][0][2] or (128, 128)
    probs = [problem(fmt, rng, O, K_, blk) for O, K_ in shapes]
    mapped = _memmap(tmp_path, [a for W, S, _ in probs for a in (W, S)])
    Ws, Ss = mapped[0::2], mapped[1::2]
    assert not Ws[0].flags.writeable and Ws[0].ctypes.data % 2 == 1
    table = gemv.MatTable(fmt, Ws, None if Ss[0] is None else Ss, blk)
    xs = np.stack([_x("exact", K, rng), _x("quantized", K, rng)])
    k = gemv.Kernels(variant)
    mats, xsel = np.array([2, 0, 1, 0, 2]), np.array([0, 1, 1, 0, 1])
    out = np.full(sum(shapes[m][0] for m in mats), np.nan, np.float32)
    y = k.gemv_batch(table, mats, k.prepare_x(fmt, xs, blk[1]), xsel, out=out)
    assert y is out or np.shares_memory(y, out)
    parts = np.split(y, np.cumsum([shapes[m][0] for m in mats])[:-1])
    for m, i, part in zip(mats, xsel, parts):
        assert worst(part, probs[m][2], xs[i]) <= TOL


@pytest.mark.parametrize("total,nthreads", [(0, 2), (1, 2), (7, 2), (1600, 2), (5000, 1), (300, 16)])
def test_guided_chunks_cover_units(total, nthreads):
    b = gemv.guided_chunks(total, nthreads)
    size = np.diff(b)
    assert b[0] == 0 and b[-1] == total and np.all(size >= 1) and np.all(size <= gemv.CHUNK_MAX)
    assert np.all(np.diff(size) <= 0)                                # largest first
    assert np.all(size[:-1] <= (total - b[:-2]) // (gemv.GUIDE * nthreads) + 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunks_span_jobs(variant, rng, monkeypatch):
    """One-row units: a region of 40 jobs hands out chunks of up to CHUNK_MAX units that
    run across job boundaries; every job's rows still come out right and in place."""
    monkeypatch.setattr(gemv, "UNIT_BYTES", 1)
    probs = [problem("fp4", rng, O, 64) for O in rng.integers(1, 90, 8)]
    table = gemv.MatTable("fp4", [W for W, _, _ in probs], [S for _, S, _ in probs])
    x = _x("quantized", 64, rng)
    k = gemv.Kernels(variant)
    mats = rng.integers(0, len(probs), 40)
    assert table.out_features[mats].sum() > 4 * gemv.CHUNK_MAX
    y = k.gemv_batch(table, mats, k.prepare_x("fp4", x))
    parts = np.split(y, np.cumsum(table.out_features[mats])[:-1])
    for m, part in zip(mats, parts):
        assert worst(part, probs[m][2], x) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_formats_one_region(variant, rng):
    """gemv_mixed: jobs of all four formats (each with its own prepared x, of different
    lengths and kinds) in one call; every job's result as from the reference."""
    k = gemv.Kernels(variant)
    tables, want, segments = [], [], []
    for fmt, (O, K, block) in zip(("fp4", "fp8", "bf16", "f32"), ((37, 2080, None), (131, 200, (128, 128)),
                                                                  (33, 1000, None), (9, 515, None))):
        probs = [problem(fmt, rng, O, K, block or (128, 128)) for _ in range(2)]
        tables.append(gemv.MatTable(fmt, [W for W, _, _ in probs], None if fmt in ("bf16", "f32")
                                    else [S for _, S, _ in probs], block or (128, 128)))
        xs = np.stack([_x("quantized", K, rng), _x("exact", K, rng)])
        mats, xsel = np.array([1, 0, 1]), np.array([0, 1, 1])
        segments.append((fmt, mats, k.prepare_x(fmt, xs, (block or (128, 128))[1]), xsel))
        want += [(probs[m][2], xs[i]) for m, i in zip(mats, xsel)]
    mixed = gemv.MixedTable(tables)
    y = k.gemv_mixed(mixed, segments[::-1])                 # any segment order
    order = [w for seg in range(3, -1, -1) for w in want[3 * seg:3 * seg + 3]]
    parts = np.split(y, np.cumsum([Wr.shape[0] for Wr, _ in order])[:-1])
    assert len(parts) == len(order)
    for (Wr, x), part in zip(order, parts):
        assert worst(part, Wr, x) <= TOL
    with pytest.raises(ValueError):                         # x prepared for another format
        k.gemv_mixed(mixed, [("fp8", np.array([0]), segments[0][2], np.array([0]))])
    with pytest.raises(ValueError):                         # row 2 of the fp4 table: none
        k.gemv_mixed(mixed, [("fp4", np.array([2]), segments[0][2], np.array([0]))])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shift", [0, -70, 40])
@pytest.mark.parametrize("K", [160, 2304])
def test_fp4_scale_paths(variant, shift, K, rng):
    """Rows whose e8m0 scales (with x's exponents) leave the fast exponent-add path (avx512)
    or the s << 23 path (avx2: bytes 0 and 255), and a NaN scale byte (255): each row must
    still match the reference (NaN for the NaN row). K = 2304 puts the odd scales in a full
    chunk of the range checks, more in their tails (the last group's 0 byte)."""
    O = 9
    W, S, _ = problem("fp4", rng, O, K)
    S[1, 2], S[2, 0], S[3, 4], S[4, K // 32 - 1] = 80, 170, 255, 0
    if K > 2048:
        S[5, 70] = 60
    Wr = dequant_fp4_weight(W, S).astype(np.float64)
    k = gemv.Kernels(variant)
    for kind in ("quantized", "exact"):
        x = np.ldexp(_x(kind, K, rng), shift).astype(np.float32)
        y = k.gemv("fp4", W, S, k.prepare_x("fp4", x))
        assert np.isnan(y[3]) and not np.isnan(np.delete(y, 3)).any()
        keep = np.arange(O) != 3
        assert worst(y[keep], Wr[keep], x) <= TOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "numba"])
@pytest.mark.parametrize("c,fits,two", [(32639, True, True), (-32896, True, True), (32640, True, False),
                                        (-32897, True, False), (8355711, True, False), (-8355711, True, False),
                                        (8355712, False, False)])
def test_fp4_integer_layout_digit_edges(variant, c, fits, two, rng):
    """x with a 32-group c * 2^E at the edges of the signed base-256 digits: two digits
    hold -32896..32639, three up to 8355711 (larger: the bf16-plane layout instead).
    The kernels must match the reference on every side of each edge, full and partial
    blocks alike."""
    K, O = 160, 11                                    # one full block of 4 groups + 1 group
    W, S, Wr = problem("fp4", rng, O, K)
    k = gemv.Kernels(variant)
    for where in (1, 129):                            # the full block, the partial one
        x = np.zeros(K, np.float32)
        x[[0, 45, 77, 128]] = np.ldexp(np.float32([1, 3, -7, 5]), [-10, -6, -6, -3])
        x[where] = np.ldexp(np.float32(c), -10 if where < 32 else -3)
        xp = k.prepare_x("fp4", x)
        assert (xp.nterms == 0) == fits
        if fits and where == 1:
            assert (xp.data.view(np.int32)[0, 0] == 1) == two      # n2: two-digit full blocks
        assert worst(k.gemv("fp4", W, S, xp), Wr, x) <= TOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "numba"])
@pytest.mark.parametrize("big", [(), (0,), (8,), (0, 3, 4, 8), (1, 2, 5, 6, 7), tuple(range(9))])
def test_fp4_integer_layout_three_digit_blocks_anywhere(variant, big, rng):
    """Full blocks that need three digits at the start, the end, in runs and alone between
    two-digit ones (the avx2 and avx512 kernels merge the layout's two lists by block
    index), with a partial last block and an odd row count."""
    K, O = 9 * 128 + 64, 13
    W, S, Wr = problem("fp4", rng, O, K)
    x = np.ldexp(rng.integers(-100, 100, K).astype(np.float32), -6)
    for b in big:
        x[128 * b + 37] = np.float32(20000.0)         # c = 20000 * 2^6 > 32639: three digits
    k = gemv.Kernels(variant)
    xp = k.prepare_x("fp4", x)
    assert xp.nterms == 0 and xp.data.view(np.int32)[0, 0] == 9 - len(big)
    assert worst(k.gemv("fp4", W, S, xp), Wr, x) <= TOL


def test_table_rejects_bad_input(rng):
    W, S, _ = problem("fp4", rng, 4, 64)
    with pytest.raises(ValueError, match="scale"):
        gemv.MatTable("fp4", [W], [S[:, :1]])
    with pytest.raises(ValueError, match="C-contiguous"):
        gemv.MatTable("bf16", [np.zeros((4, 8), np.uint16)[:, ::2]])
    k = gemv.Kernels("numba")
    table = gemv.MatTable("fp4", [W], [S])
    with pytest.raises(ValueError, match="does not match"):
        k.gemv_batch(table, [0], k.prepare_x("fp4", np.zeros(96, np.float32)))
    with pytest.raises(IndexError):
        k.gemv_batch(table, [1], k.prepare_x("fp4", np.zeros(64, np.float32)))
    with pytest.raises(ValueError, match="out"):
        k.gemv_batch(table, [0], k.prepare_x("fp4", np.zeros(64, np.float32)), out=np.zeros(5, np.float32))


def test_bf16_terms_sum_exactly(rng):
    x = (rng.standard_normal((3, 257)) * np.exp(rng.uniform(-20, 20, (3, 257)))).astype(np.float32)
    t = bf16_terms(x, 3).astype(np.uint32) << 16
    total = sum(t[j].view(np.float32).astype(np.float64) for j in range(3))
    assert np.array_equal(total, x.astype(np.float64))


# ------------------------------------------------------------------ activation quantization
def _hard_activations(rng, n, K):
    mags = np.exp(rng.uniform(np.log(1e-30), np.log(1e30), (n, K)))
    x = (mags * rng.choice([-1.0, 1.0], (n, K))).astype(np.float32)
    x[0, :K // 3] = 0.0
    x[0, K // 3:K // 2] = -0.0
    x[1] = rng.standard_normal(K).astype(np.float32) * 1e-6       # the 1e-4 floor decides
    # exact e4m3 ties (midpoints between neighbours) in a block whose max 448 gives scale 1
    grid = np.array([0.0, 2 ** -9, 2 ** -8, 3 * 2 ** -9, 1.0, 1.125, 1.25, 240.0, 256.0, 448.0])
    mids = np.concatenate([(grid[1:] + grid[:-1]) / 2, -(grid[1:] + grid[:-1]) / 2])
    row = np.zeros(K, np.float32)
    row[0] = 448.0
    row[1:K] = np.resize(mids, K - 1)
    x[2] = row
    return x


@pytest.mark.parametrize("K,block", [(300, 128), (128, 128), (77, 64), (5, 128)])
def test_act_quant_bit_exact(K, block, rng):
    for n in (3, 70):     # serial and parallel paths
        x = _hard_activations(rng, n, K)
        got, want = act_quant_values(x, block), ref_act_quant_values(x, block)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
        inplace = x.copy()                     # quant_row(x, x): its one-array block loop
        _quant_rows_in_place(inplace, block)
        assert np.array_equal(inplace.view(np.uint32), want.astype(np.float32).view(np.uint32))


@njit(boundscheck=False)
def _quant_rows_in_place(x, block):
    for r in range(x.shape[0]):
        quant_row(x[r], x[r], block)


# ------------------------------------------------------------------ variant selection
def test_selection_falls_back():
    feats = frozenset({"avx2", "fma"})
    log = cpu.select(("avx512", "avx2", "numba"), lambda v: None, feats)
    assert log.variant == "avx2" and "avx512: skipped" in log.describe()

    def broken(v):
        if v == "avx2":
            raise RuntimeError("compile failed")
        return "wrong numbers" if v == "avx512" else None
    sel = cpu.select(("avx512", "avx2", "numba"), broken, frozenset(ir.REQUIRED["avx512"]) | feats)
    assert sel.variant == "numba"
    assert "avx512: failed (wrong numbers)" in sel.log[0] and "RuntimeError" in sel.log[1]
    with pytest.raises(RuntimeError, match="no usable"):
        cpu.select(("avx512",), lambda v: None, feats)


def test_selection_real_compile_path():
    """An unknown variant is skipped; a real variant is compiled and self-checked."""
    k = gemv.kernels(("avx1024", "avx2", "numba"))
    assert k.variant == ("avx2" if "avx2" in VARIANTS else "numba")
    assert gemv.kernels().variant == VARIANTS[0]       # the best the host supports runs
    assert VARIANTS[0] in gemv.describe()


def test_ir_refuses_missing_features():
    class FakeCodegen:
        _tm_features = "+avx2,+fma,-avx512f"
    with pytest.raises(ir.UnsupportedISA, match="avx512f"):
        ir._library(FakeCodegen(), "avx512")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,K", [("fp8", 200), ("fp8", 424), ("fp8", 4096), ("fp4", 96), ("fp4", 416), ("fp4", 4096)])
def test_rows_together_equal_single_rows(variant, fmt, K, rng):
    """7 rows in one call (MXFP4 on avx512: a group of 4 sharing the x loads, a pair, a
    single row) give the same bits as each row alone. Row 1 has a scale byte (0) that sends its
    MXFP4 group to the exact-float scale path; its neighbours must not change by it."""
    W, S, _ = problem(fmt, rng, 7, K, (128, 128))
    if fmt == "fp4":
        S[1, 1] = 0
    k = gemv.Kernels(variant)
    xp = k.prepare_x(fmt, _x("quantized", K, rng), 128)
    y = k.gemv(fmt, W, S, xp, (128, 128))
    for i in range(7):
        srow = i if fmt == "fp4" else i // 128
        yi = k.gemv(fmt, np.ascontiguousarray(W[i:i + 1]), np.ascontiguousarray(S[srow:srow + 1]), xp, (128, 128))
        assert y[i].view(np.uint32) == yi[0].view(np.uint32)


def test_default_entry_points(rng):
    W, S, Wr = problem("fp4", rng, 9, 64)
    x = _x("quantized", 64, rng)
    assert worst(gemv.fp4_gemv(W, S, gemv.prepare_x_fp4(x)), Wr, x) <= TOL
    W, S, Wr = problem("fp8", rng, 9, 130)
    x = _x("exact", 130, rng)
    assert worst(gemv.fp8_gemv(W, S, gemv.prepare_x_fp8(x)), Wr, x) <= TOL
    W, _, Wr = problem("bf16", rng, 9, 33)
    assert worst(gemv.bf16_gemv(W, gemv.prepare_x_bf16(x[:33])), Wr, x[:33]) <= TOL
    W, _, Wr = problem("f32", rng, 9, 33)
    assert worst(gemv.f32_gemv(W, x[:33]), Wr, x[:33]) <= TOL


def test_prepared_x_rows_are_aligned_for_the_kernels():
    """Prepared x rows start on 64-byte boundaries wherever the kernels get them: zeros_rows
    (compiled code: decode, MoE stages) pads rows; prepare_x starts its data aligned."""
    from dsv4.runtime.kernels import gemv
    from dsv4.runtime.kernels.aligned import zeros_rows
    for rows, cols in ((1, 1), (2, 100), (3, 4144), (5, 1025)):
        z = zeros_rows(rows, cols)
        assert z.flags.c_contiguous and z.shape[0] == rows and cols <= z.shape[1] < cols + 16
        assert all(z[r].ctypes.data % 64 == 0 for r in range(rows)) and not z.any()
    k = gemv.kernels()
    x = np.random.default_rng(0).standard_normal(4 * 1024).astype(np.float32)
    for fmt in ("fp4", "fp8", "bf16", "f32"):
        xp = k.prepare_x(fmt, x[1:1025])                  # input 4 bytes off
        assert xp.data.ctypes.data % 64 == 0, fmt
        np.testing.assert_array_equal(xp.data, k.prepare_x(fmt, x[1:1025].copy()).data)


def test_weight_prefetch_follows_the_target_cpu():
    """The avx512 weight streams prefetch with prefetchnta 8 KB ahead on the CPUs where that
    was measured faster (Zen 5) and with prefetcht1 16 KB ahead elsewhere; the choice is made
    from the CPU name the code is generated for (which Numba's cache is keyed on), so the
    machine code of each target carries its own hint. Generated only, not run: no AVX-512
    host needed."""
    feats = ",".join("+" + f for f in ir.REQUIRED["avx512"])
    nta = ir.assembly("avx512", cpu="znver5", features=feats)
    t1 = ir.assembly("avx512", cpu="sapphirerapids", features=feats)
    assert "prefetchnta\t8192(" in nta and "prefetcht1" not in nta
    assert "prefetcht1\t16384(" in t1 and "prefetchnta" not in t1


def _prefetch_roots(ir_text: str, function: str) -> list[tuple[str, str]]:
    """(argument the pointer is computed from, locality) of every llvm.prefetch in one
    function of an IR module text (following getelementptr chains back to an argument)."""
    import re
    body = ir_text.split(f"@{function}(", 1)[1].split("\n}", 1)[0]
    defs = dict(re.findall(r"^\s*(%v\d+) = (.*)$", body, re.M))
    out = []
    for ptr, loc in re.findall(r"@llvm\.prefetch\.p0\(ptr (%\w+), i32 0, i32 (\d), i32 1\)", body):
        while ptr in defs:
            ptr = re.match(r"getelementptr \w+, ptr (%\w+),", defs[ptr]).group(1)
        out.append((ptr, loc))
    return out


def test_fp4_scale_rows_are_prefetched():
    """The MXFP4 kernels prefetch the rows' e8m0 scales (a stream of their own beside the
    weight rows, whose own prefetch sits in the row functions) ahead of use, with the
    weight streams' locality: the avx512 row groups and the avx2 rows. Generated only."""
    from dsv4.runtime.kernels import ir_avx2, ir_avx512, ir_avx512_int
    for pf in (ir_avx512.PREFETCH_NTA, ir_avx512.PREFETCH_T1):
        roots = _prefetch_roots(ir_avx512_int.fp4_export(pf), "dsv4_avx512_fp4")
        assert roots and set(roots) == {("%s", str(pf.locality))}
    roots = _prefetch_roots(ir_avx2.module(), "dsv4_avx2_fp4")
    assert roots and set(roots) == {("%s", str(ir_avx2.ROW_PREFETCH.locality))}
