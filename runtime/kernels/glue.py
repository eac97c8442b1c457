"""Fused small operations of the forward pass (Numba), one call where NumPy needs dozens.

Each function computes what the reference in hc.py / nn.py / rope.py / quant.blocks does
for a batch of rows, including the bf16 rounding the model applies when `rnd` is set, in
float32 with float64 row reductions. Decode runs hundreds of these per token, so fusing
them keeps the Python glue far below the time spent streaming weights.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .bits import bits_f32, f32_bits

F32 = np.float32
_OPTS = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True)


@njit(inline="always")
def bf16(v):
    """Round a float32 to the nearest bfloat16 (ties to even); NaN stays NaN (branch-free,
    so loops of it vectorize)."""
    u = f32_bits(F32(v))
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return bits_f32(u | np.uint32(0x400000) if nan else r)


@njit(cache=True, parallel=True, boundscheck=False)
def bf16_inplace_parallel(flat):
    for i in prange(flat.size):
        flat[i] = bf16(flat[i])


@njit(cache=True, boundscheck=False)
def bf16_inplace(flat):
    for i in range(flat.size):
        flat[i] = bf16(flat[i])


@njit(inline="always")
def _rnd(v, rnd):
    return bf16(v) if rnd else F32(v)


@njit(inline="always")
def _sigmoid(v):
    return F32(1.0 / (1.0 + np.exp(-np.float64(v))))


@intrinsic
def _sq_lanes(typingctx, addr, n8, rnd):
    """The 8 partial sums of sumsq as vector code: lane l adds the squares of elements j = l
    (mod 8), j < n8, of the float32 vector at addr, in order, in float64 (each value first
    rounded to bf16 as `bf16` does, when rnd). The same operations per lane as the scalar
    loop (fpext, fmul, fadd; nothing fused), so the same bits; LLVM would not vectorize it."""
    sig = types.UniTuple(types.float64, 8)(types.uint64, types.int64, types.boolean)

    def codegen(context, builder, sig, args):
        a, n, rnd_ = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vf, vi, vd = ir.VectorType(ir.FloatType(), 8), ir.VectorType(i32, 8), ir.VectorType(ir.DoubleType(), 8)

        def k(c):
            return ir.Constant(vi, [c] * 8)
        zero = ir.Constant(vd, [0.0] * 8)
        base = builder.inttoptr(a, ir.FloatType().as_pointer())
        entry = builder.block
        loop = builder.function.append_basic_block("sumsq.loop")
        done = builder.function.append_basic_block("sumsq.done")
        builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        acc = builder.phi(vd)
        v = builder.load(builder.bitcast(builder.gep(base, [i]), vf.as_pointer()), align=4)
        u = builder.bitcast(v, vi)
        up = builder.and_(builder.add(builder.add(u, k(0x7FFF)), builder.and_(builder.lshr(u, k(16)), k(1))),
                          k(-65536))
        nan = builder.icmp_unsigned(">", builder.and_(u, k(0x7FFFFFFF)), k(0x7F800000))
        rounded = builder.bitcast(builder.select(nan, builder.or_(u, k(0x400000)), up), vf)
        d = builder.fpext(builder.select(rnd_, rounded, v), vd)
        acc2 = builder.fadd(acc, builder.fmul(d, d))
        i2 = builder.add(i, ir.Constant(i64, 8))
        i.add_incoming(ir.Constant(i64, 0), entry)
        i.add_incoming(i2, loop)
        acc.add_incoming(zero, entry)
        acc.add_incoming(acc2, loop)
        builder.cbranch(builder.icmp_signed("<", i2, n), loop, done)
        builder.position_at_end(done)
        res = builder.phi(vd)
        res.add_incoming(zero, entry)
        res.add_incoming(acc2, loop)
        out = context.get_constant_undef(sig.return_type)
        for lane in range(8):
            out = builder.insert_value(out, builder.extract_element(res, ir.Constant(i32, lane)), lane)
        return out
    return sig, codegen


@njit(inline="always")
def sumsq(v, rnd):
    """Sum of squares of a float32 vector (each value bf16-rounded first when rnd) in
    float64, in 8 interleaved partial sums (a serial float64 chain is latency-bound); on a
    contiguous v the partial sums are one vector (_sq_lanes)."""
    n = v.shape[0]
    n8 = n - n % 8
    if v.strides[0] == 4:
        s0, s1, s2, s3, s4, s5, s6, s7 = _sq_lanes(np.uint64(v.ctypes.data), np.int64(n8), rnd)
    else:
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        for j in range(0, n8, 8):
            a0, a1 = np.float64(_rnd(v[j], rnd)), np.float64(_rnd(v[j + 1], rnd))
            a2, a3 = np.float64(_rnd(v[j + 2], rnd)), np.float64(_rnd(v[j + 3], rnd))
            a4, a5 = np.float64(_rnd(v[j + 4], rnd)), np.float64(_rnd(v[j + 5], rnd))
            a6, a7 = np.float64(_rnd(v[j + 6], rnd)), np.float64(_rnd(v[j + 7], rnd))
            s0 += a0 * a0
            s1 += a1 * a1
            s2 += a2 * a2
            s3 += a3 * a3
            s4 += a4 * a4
            s5 += a5 * a5
            s6 += a6 * a6
            s7 += a7 * a7
    for j in range(n8, n):
        a0 = np.float64(_rnd(v[j], rnd))
        s0 += a0 * a0
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(inline="always")
def _inv_rms(Xs, norm_eps):
    """1 / rms over all hc copies of one token, Xs [hc, d] (float64 sum, float32 result)."""
    hc, d = Xs.shape
    ms = 0.0
    for i in range(hc):
        ms += sumsq(Xs[i], False)
    return F32(1.0 / np.sqrt(np.float64(F32(ms / (hc * d))) + F32(norm_eps)))


@njit(**_OPTS)
def hc_pre_rows(X, mix, base, scale, iters, hc_eps, norm_eps, rnd, x_out, post, comb):
    """X [S, hc, d]; mix [S, M] = fn . flatten(X) (without the rms factor).
    -> x_out [S, d] = sum_i pre_i X_i, post [S, hc], comb [S, hc, hc] (Sinkhorn)."""
    S, hc, d = X.shape
    c = np.empty((hc, hc), np.float32)
    acc = np.empty(d, np.float64)
    for s in range(S):
        r = _inv_rms(X[s], norm_eps)
        pre = np.empty(hc, np.float32)
        for i in range(hc):
            pre[i] = _sigmoid(mix[s, i] * r * scale[0] + base[i]) + F32(hc_eps)
            post[s, i] = F32(2.0) * _sigmoid(mix[s, hc + i] * r * scale[1] + base[hc + i])
        for j in range(hc):
            mx = -np.inf
            for k in range(hc):
                c[j, k] = mix[s, 2 * hc + j * hc + k] * r * scale[2] + base[2 * hc + j * hc + k]
                mx = max(mx, np.float64(c[j, k]))
            tot = 0.0
            for k in range(hc):
                tot += np.exp(np.float64(c[j, k]) - mx)
            for k in range(hc):
                c[j, k] = F32(np.exp(np.float64(c[j, k]) - mx) / tot) + F32(hc_eps)
        _normalise(c, False, hc_eps)
        for _ in range(iters - 1):
            _normalise(c, True, hc_eps)
            _normalise(c, False, hc_eps)
        comb[s] = c
        _mix_rows(X[s], pre, rnd, acc, x_out[s])


@njit(inline="always")
def _mix_rows(Xs, w, rnd, acc, out):
    """out [d] = sum_i w[i] Xs[i] (Xs [hc, d]) in float64 (acc: a float64 [d] buffer),
    added in order of i; the loops run over d innermost so they vectorize."""
    hc, d = Xs.shape
    for j in range(d):
        acc[j] = 0.0
    for i in range(hc):
        wi = np.float64(w[i])
        for j in range(d):
            acc[j] += wi * np.float64(Xs[i, j])
    for j in range(d):
        out[j] = _rnd(acc[j], rnd)


@njit(inline="always")
def _normalise(c, rows, eps):
    hc = c.shape[0]
    for a in range(hc):
        tot = F32(0)
        for b in range(hc):
            tot += c[a, b] if rows else c[b, a]
        den = tot + F32(eps)
        for b in range(hc):
            if rows:
                c[a, b] = c[a, b] / den
            else:
                c[b, a] = c[b, a] / den


@njit(inline="always")
def _hc_post_row(a, X, post, comb, rnd, out):
    """out[k] = post[k] a + sum_j comb[j, k] X[j] for one token (a [d], X [hc, d])."""
    hc, d = X.shape
    acc = np.empty(d, np.float64)
    for k in range(hc):
        pk = np.float64(post[k])
        for j in range(d):
            acc[j] = pk * np.float64(a[j])
        for i in range(hc):
            cik = np.float64(comb[i, k])
            for j in range(d):
                acc[j] += cik * np.float64(X[i, j])
        for j in range(d):
            out[k, j] = _rnd(acc[j], rnd)


@njit(cache=True, parallel=True, boundscheck=False, error_model="numpy", nogil=True)
def hc_post_rows(a, X, post, comb, rnd, out):
    """out[s, k] = post[s, k] a[s] + sum_j comb[s, j, k] X[s, j]  (a [S, d], X [S, hc, d])."""
    for s in prange(X.shape[0]):
        _hc_post_row(a[s], X[s], post[s], comb[s], rnd, out[s])


@njit(**_OPTS)
def hc_post_rows_serial(a, X, post, comb, rnd, out):
    """hc_post_rows on one thread (decode: a parallel region per token costs more)."""
    for s in range(X.shape[0]):
        _hc_post_row(a[s], X[s], post[s], comb[s], rnd, out[s])


@njit(**_OPTS)
def hc_head_rows(X, mix, base, scale, hc_eps, norm_eps, rnd, out):
    """Final mix: out [S, d] = sum_i (sigmoid(mix_i r scale + base_i) + eps) X_i."""
    S, hc, d = X.shape
    acc = np.empty(d, np.float64)
    for s in range(S):
        r = _inv_rms(X[s], norm_eps)
        w = np.empty(hc, np.float64)
        for i in range(hc):
            w[i] = _sigmoid(mix[s, i] * r * scale[0] + base[i]) + F32(hc_eps)
        _mix_rows(X[s], w, rnd, acc, out[s])


@njit(**_OPTS)
def rmsnorm_rows(x, weight, eps, rnd_in, rnd_out, out):
    """out = weight * x / rms(x) per row of x [S, n] (optionally bf16 before and after)."""
    S, n = x.shape
    for s in range(S):
        ms = sumsq(x[s], rnd_in)
        r = F32(1.0 / np.sqrt(np.float64(F32(ms / n)) + F32(eps)))
        for j in range(n):
            out[s, j] = _rnd(weight[j] * (_rnd(x[s, j], rnd_in) * r), rnd_out)


@njit(inline="always")
def head_norm_vec(v, eps, rnd):
    """In place: one head vector v [D] divided by its rms (no weight)."""
    ms = sumsq(v, False)
    r = F32(1.0 / np.sqrt(np.float64(F32(ms / v.shape[0])) + F32(eps)))
    for j in range(v.shape[0]):
        v[j] = _rnd(v[j] * r, rnd)


@njit(**_OPTS)
def head_norm_rows(q, eps, rnd):
    """In place: each head vector of q [S, H, D] divided by its rms (no weight)."""
    S, H = q.shape[0], q.shape[1]
    for s in range(S):
        for h in range(H):
            head_norm_vec(q[s, h], eps, rnd)


@njit(inline="always")
def rope_angles(p, freqs, inverse, cos, sin):
    """cos, sin [len(freqs)] of the angles fp32(p) * freqs (float64 cos / sin rounded to
    float32, as Rope.cos_sin); sin negated for the inverse rotation."""
    pf = F32(p)
    for i in range(freqs.shape[0]):
        ang = np.float64(F32(pf * freqs[i]))
        cos[i] = F32(math.cos(ang))
        sin[i] = -F32(math.sin(ang)) if inverse else F32(math.sin(ang))


@njit(inline="always")
def rope_vec(v, cos, sin, rnd):
    """In place on one vector v [D]: the last 2*len(cos) dims rotated pairwise, the others
    only rounded (as the reference does)."""
    base = v.shape[0] - 2 * cos.shape[0]
    for j in range(base):
        v[j] = _rnd(v[j], rnd)
    for i in range(cos.shape[0]):
        a = v[base + 2 * i]
        b = v[base + 2 * i + 1]
        v[base + 2 * i] = _rnd(a * cos[i] - b * sin[i], rnd)
        v[base + 2 * i + 1] = _rnd(a * sin[i] + b * cos[i], rnd)


@njit(**_OPTS)
def rope_rows(x, positions, freqs, inverse, rnd):
    """In place on the last 2*len(freqs) dims of x [S, H, D]: rotate pairs by the angles
    fp32(positions[s]) * freqs (cos and sin in float64, rounded to float32, as Rope.cos_sin);
    the other dims are only rounded (as the reference does)."""
    S, H = x.shape[0], x.shape[1]
    cos = np.empty(freqs.shape[0], F32)
    sin = np.empty(freqs.shape[0], F32)
    for s in range(S):
        rope_angles(positions[s], freqs, inverse, cos, sin)
        for h in range(H):
            rope_vec(x[s, h], cos, sin, rnd)


@njit(**_OPTS)
def hadamard_rows(x, rnd):
    """In place: (x @ H_n) / sqrt(n) per row of x [R, n] (n a power of two), by the fast
    Walsh-Hadamard butterflies in float64."""
    R, n = x.shape
    buf = np.empty(n, np.float64)
    scale = 1.0 / np.sqrt(np.float64(n))
    for r in range(R):
        for j in range(n):
            buf[j] = x[r, j]
        h = 1
        while h < n:
            for i in range(0, n, 2 * h):
                for j in range(i, i + h):
                    a = buf[j]
                    b = buf[j + h]
                    buf[j] = a + b
                    buf[j + h] = a - b
            h *= 2
        for j in range(n):
            x[r, j] = _rnd(buf[j] * scale, rnd)


@njit(inline="always")
def _e2m1(v):
    """Round |v| <= 6 to the nearest e2m1 value, ties to the even code."""
    m = abs(v)
    if m < 2.0:
        q = np.rint(m * 2.0) * 0.5               # grid 0, .5, 1, 1.5 (step .5), ties even
    elif m < 4.0:
        q = np.rint(m) * 1.0                     # 2, 3 (4 on the tie 3.5)
    else:
        q = 4.0 if m <= 5.0 else 6.0             # 5 is a tie between 4 and 6 -> 4
    return np.copysign(q, v)


@njit(**_OPTS)
def q4_rows(x, block):
    """In place FP4 round trip: per block, scale 2^ceil(log2(max(amax, 6*2^-126) / 6)),
    e2m1 round to nearest even, times the scale (x [R, n])."""
    R, n = x.shape
    floor = F32(6.0 * 2.0 ** -126)
    inv6 = F32(1.0 / 6.0)
    for r in range(R):
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            a = floor
            for i in range(b0, b1):
                a = max(a, abs(x[r, i]))
            mant, e = math.frexp(np.float64(a * inv6))
            k = e - 1 if mant == 0.5 else e
            down, up = math.ldexp(1.0, -k), math.ldexp(1.0, k)     # exact powers of two
            for i in range(b0, b1):
                v = min(max(np.float64(x[r, i]) * down, -6.0), 6.0)
                x[r, i] = F32(_e2m1(v) * up)
