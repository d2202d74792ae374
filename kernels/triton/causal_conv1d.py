"""Causal depthwise conv1d in Triton: the prefill over a sequence and the one-step decode update.

Both read the previous w - 1 inputs from, and write the new ones to, rows of a conv-state pool
by index (or plain per-sequence tensors). Prefill runs one program per (sequence, channel
block, segment of time): it walks its segment step by step, loading each step's channels as
one vector and keeping the last w - 1 inputs in registers, so every input is read once (plus
w - 1 steps before the segment, or the initial state at t < 0). Right-padded rows keep the
conv state taken at each row's own length.
Same contracts as :func:`kernels.causal_conv1d.causal_conv1d_ref` and ``..._update_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._backend import BackendUnavailable
from kernels.triton._math import fast_math, silu


@triton.jit
def _conv_kernel(x, weight, bias, y, s_in, s_out, idx, lens, d, l, seg,
                 s_xb, s_xd, s_xl, s_wd, s_yb, s_yd, s_yl, s_ib, s_id, s_iw, s_ob, s_od, s_ow,
                 W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr,
                 HAS_IDX: tl.constexpr, HAS_LENS: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
                 FAST: tl.constexpr):
    b, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < d
    xp = x + b.to(tl.int64) * s_xb + rd * s_xd
    yp = y + b.to(tl.int64) * s_yb + rd * s_yd
    sp = s_in + row * s_ib + rd * s_id
    t_start = pid_l * seg
    zero = rd * 0  # scalar positions as vectors, so masks combine elementwise
    # Tap k multiplies x[t - (W - 1) + k]; taps past the width are zero (W <= 4).
    w3 = tl.load(weight + rd * s_wd + (W - 1), mask=md, other=0.0).to(tl.float32)
    w2 = tl.load(weight + rd * s_wd + (W - 2), mask=md, other=0.0).to(tl.float32)
    # The w - 1 inputs before the segment: from x, or at t < 0 from the initial state.
    x1 = _conv_input(xp, sp, zero + (t_start - 1), s_xl, s_iw, md, W, HAS_INIT)
    w1 = tl.zeros_like(w3)
    x2 = tl.zeros_like(w3)
    w0 = tl.zeros_like(w3)
    x3 = tl.zeros_like(w3)
    if W >= 3:
        w1 = tl.load(weight + rd * s_wd + (W - 3), mask=md, other=0.0).to(tl.float32)
        x2 = _conv_input(xp, sp, zero + (t_start - 2), s_xl, s_iw, md, W, HAS_INIT)
    if W >= 4:
        w0 = tl.load(weight + rd * s_wd + (W - 4), mask=md, other=0.0).to(tl.float32)
        x3 = _conv_input(xp, sp, zero + (t_start - 3), s_xl, s_iw, md, W, HAS_INIT)
    if pid_l == 0:
        # The new state is the w - 1 inputs ending at the row's length; with a pool as both
        # source and destination, every read of the old row must land before the write.
        length = tl.load(lens + b) if HAS_LENS else l
        j = tl.arange(0, WP)
        mj = j < W - 1
        src = length + j - (W - 1)
        new = tl.load(xp[:, None] + src[None, :].to(tl.int64) * s_xl,
                      mask=md[:, None] & (mj & (src >= 0))[None, :], other=0.0)
        if HAS_INIT:
            new += tl.load(sp[:, None] + (src + W - 1)[None, :] * s_iw,
                           mask=md[:, None] & (mj & (src < 0))[None, :], other=0.0).to(new.dtype)
        tl.debug_barrier()
        tl.store(s_out + row * s_ob + rd[:, None] * s_od + j[None, :] * s_ow, new.to(s_out.dtype.element_ty),
                 mask=md[:, None] & mj[None, :])
    if HAS_BIAS:
        bv = tl.load(bias + rd, mask=md, other=0.0).to(tl.float32)
    # Walk the segment one step at a time, T steps unrolled so their loads are in flight
    # together; each input is read once and slides through x1..x3 in registers.
    for t0 in range(t_start, t_start + seg, T):
        for i in tl.static_range(T):
            t = t0 + i
            mt = md & ((zero + t) < l)
            xt = tl.load(xp + t.to(tl.int64) * s_xl, mask=mt, other=0.0).to(tl.float32)
            acc = w0 * x3
            if HAS_BIAS:
                acc = bv + acc
            acc += w1 * x2
            acc += w2 * x1
            acc += w3 * xt
            if SILU:
                acc = silu(acc, FAST)
            tl.store(yp + t.to(tl.int64) * s_yl, acc, mask=mt)
            x3, x2, x1 = x2, x1, xt


@triton.jit
def _conv_input(xp, sp, pos, s_xl, s_iw, mask, W: tl.constexpr, HAS_INIT: tl.constexpr):
    # pos: a vector of one position, at least -(W - 1) (the callers ask for at most W - 1 steps back)
    v = tl.load(xp + pos.to(tl.int64) * s_xl, mask=mask & (pos >= 0), other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(sp + (pos + W - 1) * s_iw, mask=mask & (pos < 0), other=0.0).to(tl.float32)
    return v


def _conv_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, steps per program, num_warps) from the sweep in benchmarks/kernels.py (H100, d 5120):
    512 channels (4 per thread) and 16 steps per program won at 1 x 768 and 16 x 768; longer
    segments leave fewer programs to hide each step's load latency."""
    block_d = min(512, max(32, triton.next_power_of_2(d)))
    return block_d, 16, max(1, min(4, block_d // 128))


_CONV_UNROLL = 8


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None, lengths=None,
                         conv_state=None, state_indices=None, config=None):
    """x: (b, d, l) any strides (fast when channel-last, as the mixer's in_proj view is);
    weight: (d, w) with 2 <= w <= 4; bias: (d,); initial_state: (b, d, w - 1); lengths: (b,)
    valid steps per row (the new state ends there); conv_state: (p, d, w - 1) pool with
    state_indices (b,): start from and write back those rows.
    Returns y (b, d, l) in x.dtype (channel-last memory) and the new state (b, d, w - 1) in
    x.dtype, or None for it when ``conv_state`` is given (it is in the pool). ``config``:
    (BLOCK_D, steps per program, warps) instead of the default."""
    b, d, l = x.shape
    w = weight.shape[-1]
    assert weight.shape == (d, w), weight.shape
    if not 2 <= w <= 4:
        raise BackendUnavailable(f"causal_conv1d: the Triton kernel takes widths 2-4, got {w}")
    if conv_state is not None:
        assert initial_state is None and conv_state.shape[1:] == (d, w - 1), conv_state.shape
        assert state_indices is not None and state_indices.shape == (b,), "a state pool needs state_indices (b,)"
        s_in = s_out = conv_state
    else:
        s_out = torch.empty(b, d, w - 1, device=x.device, dtype=x.dtype)
        s_in = initial_state if initial_state is not None else s_out
    y = torch.empty(b, l, d, device=x.device, dtype=x.dtype).transpose(1, 2)
    block_d, seg, warps = config or _conv_config(d)
    seg = triton.cdiv(seg, _CONV_UNROLL) * _CONV_UNROLL
    dummy = s_out
    grid = (b, triton.cdiv(d, block_d), max(1, triton.cdiv(l, seg)))
    _conv_kernel[grid](
        x, weight, bias if bias is not None else dummy, y, s_in, s_out,
        state_indices if state_indices is not None else dummy, lengths if lengths is not None else dummy, d, l, seg,
        *x.stride(), weight.stride(0), *y.stride(), *s_in.stride(), *s_out.stride(),
        W=w, WP=triton.next_power_of_2(w - 1), HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
        HAS_INIT=conv_state is not None or initial_state is not None, HAS_IDX=state_indices is not None,
        HAS_LENS=lengths is not None, BLOCK_D=block_d, T=_CONV_UNROLL, FAST=fast_math(), num_warps=warps)
    return y, (None if conv_state is not None else s_out)


@triton.jit
def _conv_update_kernel(x, state, weight, bias, y, idx, d, s_xb, s_sp, s_sd, s_sw, s_wd, s_yb,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_IDX: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    b, pid_d = tl.program_id(0), tl.program_id(1)
    row = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < d
    xv = tl.load(x + b * s_xb + rd, mask=md, other=0.0)
    acc = tl.load(weight + rd * s_wd + (W - 1), mask=md, other=0.0).to(tl.float32) * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + rd, mask=md, other=0.0).to(tl.float32)
    sp = state + row * s_sp + rd * s_sd
    prev = tl.load(sp, mask=md, other=0.0)
    acc += tl.load(weight + rd * s_wd, mask=md, other=0.0).to(tl.float32) * prev.to(tl.float32)
    for k in tl.static_range(1, W - 1):  # shift left by one while accumulating
        cur = tl.load(sp + k * s_sw, mask=md, other=0.0)
        acc += tl.load(weight + rd * s_wd + k, mask=md, other=0.0).to(tl.float32) * cur.to(tl.float32)
        tl.store(sp + (k - 1) * s_sw, cur, mask=md)
    tl.store(sp + (W - 2) * s_sw, xv.to(state.dtype.element_ty), mask=md)
    if SILU:
        acc = silu(acc, False)
    tl.store(y + b * s_yb + rd, acc, mask=md)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    """x: (b, d); conv_state: (p, d, w - 1) pool updated in place; weight: (d, w); bias: (d,);
    state_indices: (b,) rows of the pool (None: row i, p == b). Returns y (b, d) in x.dtype."""
    b, d = x.shape
    w = weight.shape[-1]
    assert x.stride(1) == 1 and conv_state.shape[1:] == (d, w - 1) and (state_indices is not None or conv_state.shape[0] == b)
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    block_d = 256
    grid = (b, triton.cdiv(d, block_d))
    _conv_update_kernel[grid](x, conv_state, weight, bias if bias is not None else x, y,
                              state_indices if state_indices is not None else x, d, x.stride(0),
                              *conv_state.stride(), weight.stride(0), y.stride(0), W=w, HAS_BIAS=bias is not None,
                              SILU=activation in ("silu", "swish"), HAS_IDX=state_indices is not None,
                              BLOCK_D=block_d)
    return y
