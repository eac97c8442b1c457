"""The prefill bf16 GEMM (gemm.py, ir_gemm.py) against the float64 reference.

Needs the avx512 kernel variant (AVX-512 BF16); skipped elsewhere. Odd shapes (row counts
that are not multiples of the 8-row block, token counts not multiples of 16 lanes), both
weight formats, weights on read-only unaligned memory maps. Error bound as for gemv:
|y - ref| <= 1e-5 * (|x| @ |W|^T) per element.
"""
from __future__ import annotations

import numpy as np
import pytest

from dsv4.quant.blocks import act_quant_values
from dsv4.runtime.kernels import cpu, gemm, ir_gemm
from dsv4.runtime.kernels.selfcheck import problem
from dsv4.runtime.model import Model

pytestmark = pytest.mark.skipif(cpu.unmet("avx512", cpu.host_features()) != (),
                                reason="the bf16 GEMM needs the avx512 kernel variant")

CASES = [  # fmt, M tokens, O rows, K, block
    ("fp4", 1, 7, 32, (128, 128)),
    ("fp4", 5, 13, 96, (128, 128)),
    ("fp4", 17, 37, 2080, (128, 128)),
    ("fp4", 97, 9, 64, (128, 128)),
    ("fp4", 120, 11, 64, (128, 128)),       # 128 lanes: packed x gets 16 lanes of row padding
    ("fp8", 3, 131, 256, (128, 128)),
    ("fp8", 50, 45, 192, (32, 64)),
    ("fp8", 20, 9, 4096, (128, 128)),
]


def _quantized_x(M, K, rng):
    x = (rng.standard_normal((M, K)) * np.exp(rng.uniform(-3, 3, (M, K)))).astype(np.float32)
    return act_quant_values(x, 128)


def _mapped(tmp_path, a, offset=13):
    path = tmp_path / "w.bin"
    with open(path, "wb") as fh:
        fh.write(b"\0" * offset + np.ascontiguousarray(a).tobytes())
    return np.memmap(path, dtype=a.dtype, mode="r", offset=offset, shape=a.shape)


TILES = [False] + ([True] if cpu.amx_ready() else [])   # vdpbf16ps tiles; AMX tiles where the host has them


@pytest.mark.parametrize("amx", TILES)
@pytest.mark.parametrize("fmt,M,O,K,block", CASES)
def test_gemm_matches_reference(fmt, M, O, K, block, amx, rng, tmp_path):
    W, S, Wr = problem(fmt, rng, O, K, block)
    assert gemm.fits(fmt, K, S, block)
    x = _quantized_x(M, K, rng)
    px = gemm.PackedX.pack(x)
    lanes = -(-M // 16) * 16
    assert px is not None and px.xp.shape == (K // 2, lanes + (16 if lanes % 64 == 0 else 0))
    wide = np.full((M, O + 9), np.nan, np.float32)      # into columns 4 .. 4+O of a wider buffer
    gemm.gemm_into(px, fmt, _mapped(tmp_path, W), S, wide[:, 4:4 + O], block, amx=amx)
    y = wide[:, 4:4 + O]
    ref = x.astype(np.float64) @ Wr.T.astype(np.float64)
    bound = np.abs(x).astype(np.float64) @ np.abs(Wr).T.astype(np.float64)
    assert np.all(np.abs(y - ref) <= 1e-5 * bound + 1e-30)
    assert np.isnan(wide[:, :4]).all() and np.isnan(wide[:, 4 + O:]).all()   # nothing else written


@pytest.mark.parametrize("M,K", [(1, 32), (17, 64), (40, 96), (130, 256), (60, 64)])
def test_vector_pack_equals_plain_pack(M, K, rng):
    """The IR packing (contiguous rows, K % 32 == 0) against the Numba loop, also on rows
    that are a strided slice, and the bf16-exactness verdict on every position."""
    x = _quantized_x(M, K, rng)
    wide = np.zeros((M, 3, K), np.float32)
    wide[:, 1] = x
    for src in (x, wide[:, 1]):
        px = gemm.PackedX.pack(src)
        plain = np.empty_like(px.xp)
        assert gemm.pack_x(np.array(src), plain) and np.array_equal(px.xp, plain)
    for m, k in ((0, 0), (M - 1, K - 1), (M // 2, K // 3)):
        for bad in (1 + 2.0 ** -10, 1e-40):
            y = x.copy()
            y[m, k] = bad
            assert gemm.PackedX.pack(y) is None


def test_pack_accepts_only_bf16_numbers():
    ok = np.array([[0.0, -0.0, 1.5, -3.0 * 2.0 ** -100, 2.0 ** 100, 448.0]], np.float32)
    assert gemm.PackedX.pack(ok) is not None
    assert gemm.PackedX.pack(np.tile(ok, (40, 2))[::2, 1:11]) is not None     # strided rows
    assert gemm.PackedX.pack(ok.astype(np.float64)) is None
    for bad in (1 + 2.0 ** -10, 1e-40, 2.0 ** -127):   # mantissa bits; bf16 subnormals
        x = ok.copy()
        x[0, 2] = bad
        assert gemm.PackedX.pack(x) is None, bad
    assert gemm.PackedX.pack(np.ones((2, 3), np.float32)) is None    # odd K


def test_fits_checks_scale_range_and_tiles():
    for fmt, (lo, hi) in ir_gemm.SCALE_RANGE.items():
        K = 128
        good = np.full((4, 4), lo, np.uint8)
        good[0, 0] = hi
        assert gemm.fits(fmt, K, good, (128, 128))
        for b in (lo - 1, hi + 1):
            s = good.copy()
            s[1, 1] = b
            assert not gemm.fits(fmt, K, s, (128, 128))
    assert not gemm.fits("fp8", 96, np.full((1, 1), 127, np.uint8), (128, 128))
    assert not gemm.fits("fp8", 128, np.full((1, 4), 127, np.uint8), (128, 32))
    assert not gemm.fits("float", 128, None, (128, 128))


def test_backend_prefill_uses_gemm_and_matches_sgemm(tiny_dir, monkeypatch):
    """Default mode, a prefill-sized chunk: each matmul of the fast backend with the bf16
    GEMM equals the dequantize + sgemm path to float32 rounding, and the GEMM did run for
    every format (MXFP4 experts, FP8 projections, grouped wo_a)."""
    model = Model.load(tiny_dir, backend="fast")
    be, blk = model.be, model.w.blocks[0]
    ran = []
    orig = gemm.gemm_into
    monkeypatch.setattr(gemm, "gemm_into", lambda px, fmt, *a, **k: (ran.append(fmt), orig(px, fmt, *a, **k))[1])
    rng = np.random.default_rng(3)
    S, d = 40, model.cfg.dim
    x = rng.standard_normal((S, d)).astype(np.float32)
    a = blk.attn
    og = be.bf16(rng.standard_normal((S, model.cfg.o_groups, a.wo_a.in_features)).astype(np.float32))
    idx = rng.integers(0, model.cfg.n_routed_experts, (S, model.cfg.n_activated_experts))
    wts = rng.uniform(0.1, 1, idx.shape).astype(np.float32)

    def calls():
        return [be.linear(x, a.wq_a), be.grouped_linear(og, a.wo_a),
                be.moe_experts(x, idx, wts, blk.ffn, 10.0, 10.0)]
    fast = calls()
    assert {"fp4", "fp8"} <= set(ran) and len(ran) >= 4
    be.bf16_gemm = False
    ran.clear()
    slow = calls()
    assert not ran
    for f, s in zip(fast, slow):
        scale = np.abs(s).max()
        assert np.abs(f - s).max() <= 1e-5 * scale, np.abs(f - s).max() / scale


def test_failed_selfcheck_switches_the_gemm_off(tiny_dir, monkeypatch, caplog):
    from dsv4.runtime.kernels import selfcheck
    model = Model.load(tiny_dir, backend="fast")
    monkeypatch.setattr(selfcheck, "check_gemm", lambda: "wrong numbers")
    x = np.random.default_rng(4).standard_normal((30, model.cfg.dim)).astype(np.float32)
    w = model.w.blocks[0].attn.wq_a
    y = model.be.linear(x, w)
    assert not model.be.bf16_gemm and "wrong numbers" in caplog.text
    model.be.bf16_gemm, model.be._gemm_checked = True, True
    assert np.abs(model.be.linear(x, w) - y).max() <= 1e-5 * np.abs(y).max()


def test_amx_tile_kernel_only_where_the_target_has_amx(monkeypatch, rng):
    """The avx512 module holds the AMX tile kernel only for an AMX target (else a trap that
    the driver never calls), and asking for AMX tiles on a host without them is refused."""
    import llvmlite.binding as llb
    from dsv4.runtime.kernels import ir
    for amx in (False, True):
        text = ir.module_text("avx512", amx)
        llb.parse_assembly(text).verify()
        assert ("@llvm.x86.tdpbf16ps" in text) == amx and ("@llvm.trap" in text) != amx
    monkeypatch.setattr(cpu, "amx_ready", lambda: False)
    W, S, _ = problem("fp4", rng, 8, 64)
    px = gemm.PackedX.pack(_quantized_x(3, 64, rng))
    with pytest.raises(ValueError, match="AMX"):
        gemm.gemm_into(px, "fp4", W, S, np.empty((3, 8), np.float32), amx=True)
