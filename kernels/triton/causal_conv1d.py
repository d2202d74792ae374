"""Causal depthwise conv1d in Triton: the prefill over a sequence and the one-step decode update.

Both read the previous w - 1 inputs from, and write the new ones to, rows of a conv-state pool
by index (or plain per-sequence tensors). Prefill tiles (sequence, channel block, time block);
the time block's first w - 1 taps reach into the previous block or, at t < w - 1, into the
initial state. Right-padded rows keep the conv state taken at each row's own length.
Same contracts as :func:`kernels.causal_conv1d.causal_conv1d_ref` and ``..._update_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(x, weight, bias, y, s_in, s_out, idx, lens, d, l,
                 s_xb, s_xd, s_xl, s_wd, s_yb, s_yd, s_yl, s_ib, s_id, s_iw, s_ob, s_od, s_ow,
                 W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr,
                 HAS_IDX: tl.constexpr, HAS_LENS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    b, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    md, mt = rd < d, t < l
    x_b = x + b * s_xb
    acc = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + rd, mask=md, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        pos = t + (k - (W - 1))  # input index of tap k; < 0 reaches into the initial state
        wk = tl.load(weight + rd * s_wd + k, mask=md, other=0.0).to(tl.float32)
        xv = tl.load(x_b + rd[:, None] * s_xd + pos[None, :] * s_xl,
                     mask=md[:, None] & (mt & (pos >= 0))[None, :], other=0.0).to(tl.float32)
        if HAS_INIT:
            xv += tl.load(s_in + row * s_ib + rd[:, None] * s_id + (pos + W - 1)[None, :] * s_iw,
                          mask=md[:, None] & (pos < 0)[None, :], other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + b * s_yb + rd[:, None] * s_yd + t[None, :] * s_yl, acc, mask=md[:, None] & mt[None, :])
    if pid_l == 0:
        # The new state is the w - 1 inputs ending at the row's length; with a pool as both
        # source and destination, every read of the old row must land before the write.
        length = tl.load(lens + b) if HAS_LENS else l
        j = tl.arange(0, WP)
        mj = j < W - 1
        src = length + j - (W - 1)
        new = tl.load(x_b + rd[:, None] * s_xd + src[None, :] * s_xl,
                      mask=md[:, None] & (mj & (src >= 0))[None, :], other=0.0)
        if HAS_INIT:
            new += tl.load(s_in + row * s_ib + rd[:, None] * s_id + (src + W - 1)[None, :] * s_iw,
                           mask=md[:, None] & (mj & (src < 0))[None, :], other=0.0).to(new.dtype)
        tl.debug_barrier()
        tl.store(s_out + row * s_ob + rd[:, None] * s_od + j[None, :] * s_ow, new.to(s_out.dtype.element_ty),
                 mask=md[:, None] & mj[None, :])


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None, lengths=None,
                         conv_state=None, state_indices=None, config=None):
    """x: (b, d, l) any strides; weight: (d, w); bias: (d,); initial_state: (b, d, w - 1);
    lengths: (b,) valid steps per row (the new state ends there); conv_state: (p, d, w - 1) pool
    with state_indices (b,): start from and write back those rows.
    Returns y (b, d, l) in x.dtype (channel-last memory) and the new state (b, d, w - 1) in
    x.dtype, or None for it when ``conv_state`` is given (it is in the pool). ``config``:
    (BLOCK_D, BLOCK_L, warps) instead of the default."""
    b, d, l = x.shape
    w = weight.shape[-1]
    assert weight.shape == (d, w) and w >= 2, weight.shape
    if conv_state is not None:
        assert initial_state is None and conv_state.shape[1:] == (d, w - 1), conv_state.shape
        assert state_indices is not None and state_indices.shape == (b,), "a state pool needs state_indices (b,)"
        s_in = s_out = conv_state
    else:
        s_out = torch.empty(b, d, w - 1, device=x.device, dtype=x.dtype)
        s_in = initial_state if initial_state is not None else s_out
    y = torch.empty(b, l, d, device=x.device, dtype=x.dtype).transpose(1, 2)
    block_d, block_l, warps = config or (64, 32, 4)
    assert block_l >= w - 1
    dummy = s_out
    grid = (b, triton.cdiv(d, block_d), max(1, triton.cdiv(l, block_l)))
    _conv_kernel[grid](
        x, weight, bias if bias is not None else dummy, y, s_in, s_out,
        state_indices if state_indices is not None else dummy, lengths if lengths is not None else dummy, d, l,
        *x.stride(), weight.stride(0), *y.stride(), *s_in.stride(), *s_out.stride(),
        W=w, WP=triton.next_power_of_2(w - 1), HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
        HAS_INIT=conv_state is not None or initial_state is not None, HAS_IDX=state_indices is not None,
        HAS_LENS=lengths is not None, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps)
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
        acc = acc * tl.sigmoid(acc)
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
