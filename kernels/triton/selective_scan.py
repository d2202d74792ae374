"""Prefill selective scan in Triton: parallel over (sequence, channel block), chunked over time.

Each program keeps its channels' state h in fp32 registers and walks the sequence in chunks
of T steps, in one of three ways (``_config`` picks by grid size):

- "channel": a step loop in which each thread owns whole channels (all n states of a channel
  in its registers), so the sum over n for y, the softplus, the gate and the loads and stores
  of u, delta, z and y are per thread, with no shuffles, barriers or shared memory in the
  loop. It runs about as many instructions per step as "seq" but exposes no per-step latency,
  and is picked once the grid has 2048 warps of 32 channels (13 sequences at d 5120);
- "seq": a step loop over a (BLOCK_D, n) tile that the compiler spreads over lanes along n,
  more threads per channel, for mid-sized grids and, in narrow blocks, for 2 or 3 sequences;
- "chunked": the recurrence h_t = a_t * h_{t-1} + b_t as an associative scan over (a, b)
  pairs along time, the T steps in log2(T) parallel rounds, for a single sequence.

In the step loops the T steps of a chunk are unrolled so their loads are in flight together.
Either way the chunk's end state carries into the next chunk.

Inputs are read through their strides, so the channel-last views the mixer produces
(``in_proj(h).transpose(1, 2)``) need no copies, and y is written channel-last for out_proj.
Ragged batches are right-padded: steps at or past a row's length get delta = 0, so the
state passes through the padding unchanged (exp(0 * A) = 1, delta * B * u = 0).
The initial state can come from, and the final state go to, rows of a state pool.
Same contract as :func:`kernels.selective_scan.selective_scan_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._math import exp2, fast_math, silu, softplus

@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _scan_kernel(u, delta, A, B, C, D, z, bias, y, h_in, h_out, idx, lens,
                 d, l, n,
                 s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                 s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_hb, s_hd, s_ob, s_od,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST: tl.constexpr, HAS_H0: tl.constexpr, HAS_IDX: tl.constexpr, HAS_LENS: tl.constexpr,
                 STEP_LOOP: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    b, pid_d = tl.program_id(0), tl.program_id(1)
    row = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)  # state row for this sequence
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    rt = tl.arange(0, T)
    md, mn = rd < d, rn < n
    m2 = md[:, None] & mn[None, :]
    length = tl.load(lens + b) if HAS_LENS else l
    # Padded n columns get A = 0 and B = 0: their state stays 0 and adds nothing to y.
    a2 = tl.load(A + rd[:, None] * s_Ad + rn[None, :], mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_H0:
        h = tl.load(h_in + row * s_hb + rd[:, None] * s_hd + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if HAS_D:
        dv = tl.load(D + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bv = tl.load(bias + rd, mask=md, other=0.0).to(tl.float32)
    u_b, t_b, z_b, y_b = u + b * s_ub, delta + b * s_tb, z + b * s_zb, y + b * s_yb
    B_b, C_b = B + b * s_Bb, C + b * s_Cb
    for t0 in range(0, l, T):
        if STEP_LOOP:
            # Step by step with the state in registers; the chunk's T steps are unrolled so their
            # loads (which do not depend on the state) are all in flight before the first update.
            for i in tl.static_range(T):
                t = t0 + i
                mdt = md & ((rd * 0 + t) < l)
                mnt = mn & ((rn * 0 + t) < l)
                uu = tl.load(u_b + rd * s_ud + t * s_ul, mask=mdt, other=0.0).to(tl.float32)
                dt = tl.load(t_b + rd * s_td + t * s_tl, mask=mdt, other=0.0).to(tl.float32)
                Bt = tl.load(B_b + rn * s_Bn + t * s_Bl, mask=mnt, other=0.0).to(tl.float32)
                Ct = tl.load(C_b + rn * s_Cn + t * s_Cl, mask=mnt, other=0.0).to(tl.float32)
                if HAS_Z:
                    zz = tl.load(z_b + rd * s_zd + t * s_zl, mask=mdt, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt += bv
                if SOFTPLUS:  # torch's softplus: identity above 20
                    dt = softplus(dt, FAST)
                dt = tl.where((rd * 0 + t) < length, dt, 0.0)  # 0 past the row's end
                h = exp2(dt[:, None] * a2, FAST) * h + (dt * uu)[:, None] * Bt[None, :]
                yy = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    yy += uu * dv
                if HAS_Z:
                    yy *= silu(zz, FAST)
                tl.store(y_b + rd * s_yd + t * s_yl, yy, mask=mdt)
        else:
            # The chunk as an associative scan over (a, b) pairs along time.
            t = t0 + rt
            mt = t < l
            mdt = md[:, None] & mt[None, :]
            mnt = mn[:, None] & mt[None, :]
            uu = tl.load(u_b + rd[:, None] * s_ud + t[None, :] * s_ul, mask=mdt, other=0.0).to(tl.float32)
            dt = tl.load(t_b + rd[:, None] * s_td + t[None, :] * s_tl, mask=mdt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bv[:, None]
            if SOFTPLUS:
                dt = softplus(dt, FAST)
            dt = tl.where((t < length)[None, :], dt, 0.0)  # (BLOCK_D, T)
            Bt = tl.load(B_b + rn[:, None] * s_Bn + t[None, :] * s_Bl, mask=mnt, other=0.0).to(tl.float32)
            Ct = tl.load(C_b + rn[:, None] * s_Cn + t[None, :] * s_Cl, mask=mnt, other=0.0).to(tl.float32)
            da = exp2(dt[:, None, :] * a2[:, :, None], FAST)  # (BLOCK_D, BLOCK_N, T)
            dbu = (dt * uu)[:, None, :] * Bt[None, :, :]  # (BLOCK_D, BLOCK_N, T)
            ca, cb = tl.associative_scan((da, dbu), axis=2, combine_fn=_linear_combine)
            hs = ca * h[:, :, None] + cb  # state after each step of the chunk
            yy = tl.sum(hs * Ct[None, :, :], axis=1)  # (BLOCK_D, T)
            # The chunk's last column is the carried state (tail steps past l have delta 0).
            h = tl.sum(tl.where((rt == T - 1)[None, None, :], hs, 0.0), axis=2)
            if HAS_D:
                yy += uu * dv[:, None]
            if HAS_Z:
                zz = tl.load(z_b + rd[:, None] * s_zd + t[None, :] * s_zl, mask=mdt, other=0.0).to(tl.float32)
                yy *= silu(zz, FAST)
            tl.store(y_b + rd[:, None] * s_yd + t[None, :] * s_yl, yy, mask=mdt)
    tl.store(h_out + row * s_ob + rd[:, None] * s_od + rn[None, :], h, mask=m2)


@triton.jit
def _channel_step(h, a2, t, l, length, rd, rn, md, mn, u_b, t_b, z_b, y_b, B_b, C_b, dv, bv,
                  s_ud, s_ul, s_td, s_tl, s_Bn, s_Bl, s_Cn, s_Cl, s_zd, s_zl, s_yd, s_yl,
                  HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                  HAS_LENS: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, MASK_T: tl.constexpr,
                  FAST: tl.constexpr):
    """One step of the "channel" scan: h is (BLOCK_N, BLOCK_D), each thread holding whole columns."""
    if MASK_T:
        m = md & ((rd * 0 + t) < l)
        tc = tl.minimum(t, l - 1)  # B and C are read in bounds past the end; those steps change nothing
    else:
        m = md
        tc = t
    if EVEN_D and not MASK_T:
        uu = tl.load(u_b + rd * s_ud + t * s_ul).to(tl.float32)
        dt = tl.load(t_b + rd * s_td + t * s_tl).to(tl.float32)
        zz = tl.load(z_b + rd * s_zd + t * s_zl).to(tl.float32) if HAS_Z else None
    else:
        uu = tl.load(u_b + rd * s_ud + t * s_ul, mask=m, other=0.0).to(tl.float32)
        dt = tl.load(t_b + rd * s_td + t * s_tl, mask=m, other=0.0).to(tl.float32)
        zz = tl.load(z_b + rd * s_zd + t * s_zl, mask=m, other=0.0).to(tl.float32) if HAS_Z else None
    if EVEN_N:
        Bt = tl.load(B_b + rn * s_Bn + tc * s_Bl).to(tl.float32)
        Ct = tl.load(C_b + rn * s_Cn + tc * s_Cl).to(tl.float32)
    else:
        Bt = tl.load(B_b + rn * s_Bn + tc * s_Bl, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_b + rn * s_Cn + tc * s_Cl, mask=mn, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bv
    if SOFTPLUS:  # torch's softplus: identity above 20
        dt = softplus(dt, FAST)
    if HAS_LENS or MASK_T:
        dt = tl.where((rd * 0 + t) < length, dt, 0.0)  # 0 past the row's end
    h = exp2(dt[None, :] * a2, FAST) * h + Bt[:, None] * (dt * uu)[None, :]
    yy = tl.sum(h * Ct[:, None], axis=0)
    if HAS_D:
        yy += uu * dv
    if HAS_Z:
        yy *= silu(zz, FAST)
    if EVEN_D and not MASK_T:
        tl.store(y_b + rd * s_yd + t * s_yl, yy)
    else:
        tl.store(y_b + rd * s_yd + t * s_yl, yy, mask=m)
    return h


@triton.jit
def _scan_channel_kernel(u, delta, A, B, C, D, z, bias, y, h_in, h_out, idx, lens,
                         d, l, n,
                         s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                         s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_hb, s_hd, s_ob, s_od,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, FAST: tl.constexpr, HAS_H0: tl.constexpr, HAS_IDX: tl.constexpr,
                         HAS_LENS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
                         EVEN_D: tl.constexpr, EVEN_N: tl.constexpr):
    # The state is (BLOCK_N, BLOCK_D) and only ever built from, or taken apart into, 1D vectors
    # over channels (A and the states are read and written one n at a time), so the compiler
    # lays it out with whole channels per thread. A 2D load of the (d, n) state would be laid
    # out along n, spreading each channel over lanes and costing shuffles and shared-memory
    # transposes at every step.
    b, pid_d = tl.program_id(0), tl.program_id(1)
    row = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)  # state row for this sequence
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    md, mn = rd < d, rn < n
    length = tl.load(lens + b) if HAS_LENS else l
    # Padded n rows get A = 0 and B = 0: their state stays 0 and adds nothing to y.
    a2 = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k in tl.static_range(BLOCK_N):
        mk = md & ((rd * 0 + k) < n)
        ak = tl.load(A + rd * s_Ad + k, mask=mk, other=0.0).to(tl.float32) * 1.4426950408889634
        a2 = tl.where(rn[:, None] == k, ak[None, :], a2)
        if HAS_H0:
            hk = tl.load(h_in + row * s_hb + rd * s_hd + k, mask=mk, other=0.0).to(tl.float32)
            h = tl.where(rn[:, None] == k, hk[None, :], h)
    dv = tl.load(D + rd, mask=md, other=0.0).to(tl.float32) if HAS_D else None
    bv = tl.load(bias + rd, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else None
    u_b, t_b, z_b, y_b = u + b * s_ub, delta + b * s_tb, z + b * s_zb, y + b * s_yb
    B_b, C_b = B + b * s_Bb, C + b * s_Cb
    # Whole chunks without time masks, then the tail with them.
    l_full = l - l % T
    for t0 in range(0, l_full, T):
        for i in tl.static_range(T):
            h = _channel_step(h, a2, t0 + i, l, length, rd, rn, md, mn, u_b, t_b, z_b, y_b, B_b, C_b, dv, bv,
                              s_ud, s_ul, s_td, s_tl, s_Bn, s_Bl, s_Cn, s_Cl, s_zd, s_zl, s_yd, s_yl,
                              HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_LENS, EVEN_D, EVEN_N, False, FAST)
    for t0 in range(l_full, l, T):
        for i in tl.static_range(T):
            h = _channel_step(h, a2, t0 + i, l, length, rd, rn, md, mn, u_b, t_b, z_b, y_b, B_b, C_b, dv, bv,
                              s_ud, s_ul, s_td, s_tl, s_Bn, s_Bl, s_Cn, s_Cl, s_zd, s_zl, s_yd, s_yl,
                              HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_LENS, EVEN_D, EVEN_N, True, FAST)
    for k in tl.static_range(BLOCK_N):
        hk = tl.sum(tl.where(rn[:, None] == k, h, 0.0), axis=0)
        tl.store(h_out + row * s_ob + rd * s_od + k, hk, mask=md & ((rd * 0 + k) < n))


def _config(b: int, d: int, n: int) -> tuple[str, int, int, int, int | None]:
    """(kind, BLOCK_D, T, num_warps, maxnreg), from sweeps on an H100 at d 5120, n 16, bf16 inputs
    (``python -m benchmarks.kernels --sweep --only scan``). With a warp per 32 channels of 16
    sequences the "channel" step loop wins (16 x 768: 0.667 ms against 1.01 ms for the best "seq"
    configuration; mamba-ssm 2.26 ms); with 4 or 8 sequences the "seq" loop's extra threads per
    channel win (4 x 768: 0.456 against 0.57 ms; 8 x 768: 0.575 against 0.60 ms), so the switch
    sits at 2048 warps (13 sequences at d 5120, about 4 warps per SM scheduler of an H100).
    The channel loop is capped at 96 registers per thread: left alone the compiler takes 120,
    an SM then holds 16 warps instead of 20, and the 2 560 warps of 16 x 768 run in two waves
    (1.38 ms; 88 registers 0.669 ms, 80 spill and take 0.766 ms, 104 fit 18 warps: 1.14 ms). T 4 and 8
    tie (0.659 / 0.667 ms); 16 needs 128 registers (1.15 ms). With 2 or 3 sequences the "seq" loop
    with 16 channels per program and 16 steps per chunk wins: the whole 64-layer prefill, replayed
    from a CUDA graph, takes 20.7 ms at 2 x 384 and 48.4 ms at 3 x 768, against 25.4 and 71.1 ms
    with the chunked scan, which then splits too few channel blocks. A single sequence keeps the
    chunked scan (1 x 768: 26.4 ms against 31.8 ms for that "seq" loop in the model, although
    the loop alone timed faster on synthetic inputs: 0.254 against 0.273 ms per layer)."""
    if n <= 16 and b * triton.cdiv(d, 32) >= 2048:
        return "channel", 64, 8, 2, 96
    for block_d in (128, 64, 32):
        if b * triton.cdiv(d, block_d) >= 512:
            return "seq", block_d, 8, 4, None
    if b == 1 and triton.next_power_of_2(n) <= 16:
        return "chunked", 4, 32, 4, None
    return "seq", 16, (16 if triton.next_power_of_2(n) <= 16 else 8), 2, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, lengths=None, state=None, state_indices=None, config=None):
    """u, delta, z: (b, d, l) any strides; A: (d, n); B, C: (b, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n); lengths: (b,) valid steps per row (delta is 0 past them);
    state: (p, d, n) pool (float32, or bfloat16 storage) with state_indices (b,): start from and
    write back those rows; the scan itself always runs in fp32.
    Returns y (b, d, l) in u.dtype (channel-last memory) and the last state (b, d, n) float32,
    or None for it when ``state`` is given (it is in the pool).
    ``config``: (kind "channel" | "seq" | "chunked", BLOCK_D, T, num_warps[, maxnreg]) overrides the
    tuned default."""
    b, d, l = u.shape
    n = A.shape[-1]
    assert delta.shape == (b, d, l) and B.shape == (b, n, l) and C.shape == (b, n, l), (delta.shape, B.shape)
    if state is not None:
        assert initial_state is None and state.shape[1:] == (d, n), state.shape
        assert state.stride(2) == 1, "the pool's n axis must be contiguous"
        assert state_indices is not None and state_indices.shape == (b,), "a state pool needs state_indices (b,)"
        h_in = h_out = state
    else:
        h_out = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
        h_in = initial_state.float().contiguous() if initial_state is not None else h_out
    A = A.float().contiguous()
    y = torch.empty(b, l, d, device=u.device, dtype=u.dtype).transpose(1, 2)
    kind, block_d, T, warps, *cap = config or _config(b, d, n)
    fast = fast_math()
    dummy = h_out
    zz = z if z is not None else u
    grid = (b, triton.cdiv(d, block_d))
    args = (u, delta, A, B, C, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
            y, h_in, h_out, state_indices if state_indices is not None else dummy,
            lengths if lengths is not None else dummy, d, l, n,
            *u.stride(), *delta.stride(), A.stride(0), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
            h_in.stride(0), h_in.stride(1), h_out.stride(0), h_out.stride(1))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 FAST=fast, HAS_H0=state is not None or initial_state is not None,
                 HAS_IDX=state_indices is not None,
                 HAS_LENS=lengths is not None, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n), T=T,
                 num_warps=warps)
    if cap and cap[0] and fast:  # an option of NVIDIA's compiler; the interpreter and ROCm have none
        flags["maxnreg"] = cap[0]
    if kind == "channel":
        _scan_channel_kernel[grid](*args, **flags, EVEN_D=d % block_d == 0, EVEN_N=n == flags["BLOCK_N"])
    else:
        _scan_kernel[grid](*args, **flags, STEP_LOOP=kind == "seq")
    return y, (None if state is not None else h_out)
