"""Codec tests against independent, per-element definitions of the OCP formats."""
import math
import struct

import numpy as np
import pytest

from dsv4.quant import blocks, formats


def ocp_e4m3(code: int) -> float:
    """OCP e4m3fn definition written out per code."""
    s = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return s * m / 8.0 * 2.0 ** (1 - 7)
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


def brute_nearest(x: float, values: list[float], codes: list[int]) -> int:
    """Nearest representable value; ties go to the code with an even mantissa."""
    best = None
    for v, c in zip(values, codes):
        d = abs(abs(x) - v)
        key = (d, c & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def test_e4m3_all_256_codes_match_ocp():
    got = formats.e4m3_decode(np.arange(256, dtype=np.uint8))
    for c in range(256):
        want = ocp_e4m3(c)
        if math.isnan(want):
            assert np.isnan(got[c]), c
        else:
            assert got[c] == np.float32(want), (c, got[c], want)
    assert got[0x7E] == 448 and got[0x01] == 2.0 ** -9 and got[0x08] == 2.0 ** -6
    assert np.isnan(got[0x7F]) and np.isnan(got[0xFF])


def test_e4m3_encode_inverts_every_finite_code():
    codes = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=np.uint8)
    back = formats.e4m3_encode(formats.e4m3_decode(codes))
    assert np.array_equal(back, codes)


def test_e4m3_encode_rounds_to_nearest_even_and_saturates():
    mags = [ocp_e4m3(c) for c in range(0x7F)]
    rng = np.random.default_rng(0)
    # random values, every midpoint, and values beyond the largest finite one
    mids = [(a + b) / 2 for a, b in zip(mags[:-1], mags[1:])]
    xs = np.concatenate([rng.uniform(-500, 500, 3000), rng.uniform(-0.05, 0.05, 2000),
                         np.array(mids), -np.array(mids), [449.0, 1e9, -1e9]])
    got = formats.e4m3_encode(xs)
    for x, g in zip(xs, got):
        want = brute_nearest(min(abs(x), 448.0), mags, list(range(0x7F)))
        assert (g & 0x7F) == want, (x, g, want)
        assert bool(g & 0x80) == (x < 0)
    assert formats.e4m3_encode(np.array([np.nan]))[0] == 0x7F


def test_e8m0_codec():
    b = np.arange(256, dtype=np.uint8)
    v = formats.e8m0_decode(b)
    for c in range(255):
        assert v[c] == np.float32(2.0 ** (c - 127))
    assert np.isnan(v[255])
    assert np.array_equal(formats.e8m0_encode(np.arange(-127, 128)), np.arange(0, 255))
    with pytest.raises(ValueError):
        formats.e8m0_encode(np.array([128]))


def test_e2m1_codes_and_rounding_ties_to_even():
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    vals = formats.e2m1_decode(np.arange(16))
    assert list(vals[:8]) == mags and list(vals[8:]) == [-m for m in mags]
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 7.0: 6.0}
    for x, want in ties.items():
        assert formats.e2m1_decode(formats.e2m1_encode(np.array([x])))[0] == want
        assert formats.e2m1_decode(formats.e2m1_encode(np.array([-x])))[0] == -want
    xs = np.random.default_rng(1).uniform(-7, 7, 2000)
    got = formats.e2m1_encode(xs)
    for x, g in zip(xs, got):
        assert (g & 7) == brute_nearest(min(abs(x), 6.0), mags, list(range(8)))


def test_fp4_nibble_order_low_is_even_element():
    nib = np.array([[1, 2, 3, 4, 15, 0]], dtype=np.uint8)
    packed = formats.fp4_pack(nib)
    assert list(packed[0]) == [0x21, 0x43, 0x0F]
    assert np.array_equal(formats.fp4_unpack(packed.view(np.int8)), nib)


def test_bf16_round_to_nearest_even_against_struct():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    got = formats.f32_to_bf16(x)
    for xi, gi in zip(x[:3000], got[:3000]):
        u = struct.unpack("<I", struct.pack("<f", float(xi)))[0]
        hi, lo = u >> 16, u & 0xFFFF
        if lo > 0x8000 or (lo == 0x8000 and hi & 1):
            hi += 1
        assert gi == (hi & 0xFFFF), (xi, hex(u), hex(gi))
    assert formats.bf16_round(np.float32([1.0 + 2 ** -8]))[0] == 1.0  # tie -> even
    assert formats.bf16_round(np.float32([1.0 + 3 * 2 ** -8]))[0] == 1.0 + 2 ** -6
    assert np.isnan(formats.bf16_round(np.float32([np.nan]))[0])


def test_ceil_log2_exact():
    for t in [1.0, 2.0, 3.0, 0.75, 2.0 ** -130, 1e-4 / 448, 448.0 / 448]:
        want = math.ceil(math.log2(float(np.float32(t))))
        assert blocks.ceil_log2(np.float32(t)) == want, t
    assert blocks.ceil_log2(np.float32(1.0) + np.float32(2 ** -23)) == 1


def test_q8_hand_computed_block():
    x = np.zeros(64, np.float32)
    x[0], x[1], x[2] = 100.0, 0.3, -3.3
    # amax 100 -> 100/448 = 0.2232 -> scale 2^-2; 100/0.25 = 400 is a tie between 384
    # and 416 -> 384 (even mantissa); 0.3/0.25 = 1.2 -> e4m3 1.25 -> 0.3125
    y = blocks.q8(x, 64)
    assert y[0] == 96.0 and y[1] == np.float32(0.3125)
    assert y[2] == np.float32(-13.0 * 0.25)  # -13.2 -> -13 (step 1 in [8,16))
    # all-zero block uses the 1e-4 floor and stays zero
    assert np.all(blocks.q8(np.zeros(128, np.float32)) == 0)


def test_q8_matches_per_block_definition_and_partial_blocks():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 448)) * np.exp(rng.uniform(-6, 6, (5, 1)))).astype(np.float32)
    y = blocks.q8(x, 64)
    for r in range(5):
        for b in range(7):
            blk = x[r, 64 * b:64 * (b + 1)].astype(np.float64)
            a = max(float(np.abs(blk).max()), float(np.float32(1e-4)))
            s = 2.0 ** math.ceil(math.log2(float(np.float32(a) * np.float32(1 / 448))))
            want = [ocp_e4m3(int(formats.e4m3_encode(np.array([v / s]))[0])) * s for v in blk]
            assert np.array_equal(y[r, 64 * b:64 * (b + 1)], np.float32(want))
    # a length that is not a multiple of the block: the short block has its own scale
    z = np.concatenate([np.full(64, 1000.0, np.float32), np.full(10, 0.01, np.float32)])
    assert np.allclose(blocks.q8(z, 64)[64:], 0.01, rtol=0.07)


def test_q4_hand_computed_and_codes_roundtrip():
    x = np.zeros(32, np.float32)
    x[:4] = [12.0, 1.0, -5.0, 0.2]
    # amax 12 -> 12/6 = 2 -> scale 2: 1/2 = .5 -> .5 ; -5/2 = -2.5 -> -2 (tie to even) ; .1 -> 0
    y = blocks.q4(x)
    assert list(y[:4]) == [12.0, 1.0, -4.0, 0.0]
    packed, k = blocks.fp4_quantize_blocks(np.tile(x, (3, 2)))
    assert packed.shape == (3, 32) and k.shape == (3, 2) and np.all(k == 1)
    assert np.array_equal(blocks.fp4_dequantize_blocks(packed, k), np.tile(y, (3, 2)))


def test_act_quant_codes_and_values_agree():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 300)).astype(np.float32) * 7
    codes, k = blocks.act_quant(x, 128)
    assert codes.shape == (3, 300) and k.shape == (3, 3)
    vals = formats.e4m3_decode(codes) * np.repeat(np.exp2(k.astype(np.float64)), 128, axis=1)[:, :300]
    assert np.array_equal(vals.astype(np.float32), blocks.act_quant_values(x, 128))
    # every block's largest code is within the top binade of e4m3
    assert np.all(np.abs(formats.e4m3_decode(codes[:, :128])).max(axis=1) > 224)


def test_dequant_fp8_weight_against_loops():
    rng = np.random.default_rng(5)
    o, kdim = 200, 300  # partial tiles in both directions
    w = rng.integers(0, 256, (o, kdim), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0
    s = rng.integers(120, 135, (2, 3), dtype=np.uint8)
    got = blocks.dequant_fp8_weight(w, s)
    for i in range(0, o, 37):
        for j in range(0, kdim, 29):
            want = ocp_e4m3(int(w[i, j])) * 2.0 ** (int(s[i // 128, j // 128]) - 127)
            assert got[i, j] == np.float32(want)


def test_dequant_fp4_weight_against_loops():
    rng = np.random.default_rng(6)
    o, kdim = 7, 96
    w = rng.integers(-128, 128, (o, kdim // 2), dtype=np.int8)
    s = rng.integers(118, 136, (o, kdim // 32), dtype=np.uint8)
    got = blocks.dequant_fp4_weight(w, s)
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    for i in range(o):
        for j in range(kdim):
            byte = int(w[i, j // 2]) & 0xFF
            nib = byte & 0xF if j % 2 == 0 else byte >> 4
            v = table[nib & 7] * (-1 if nib & 8 else 1)
            assert got[i, j] == np.float32(v * 2.0 ** (int(s[i, j // 32]) - 127))
