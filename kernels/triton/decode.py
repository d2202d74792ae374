"""The decode step's in_proj, conv update + SiLU and x_proj partial sums in one Triton kernel.
Same contract as :func:`kernels.decode.mixer_in_ref`.

One program per block of in_proj rows streams them through the tensor-core dot against the
few normalised rows. A block of z rows is stored; a block of x rows runs the conv update on its
channels' pool rows, applies SiLU and adds ``x @ x_proj[:, block]^T`` into the float32 output
atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._math import silu
from kernels.triton._pdl import enter, next_args, pdl_args, prefetch_rows, prefetch_span

# Elements of each in_proj row prefetched into L2 while the previous kernel finishes (0: none).
PREFETCH_K = 256


@triton.jit
def _mixer_in_kernel(a_in, w_in, cpool, cw, cb, idx, w_x, x_out, z_out, xp, nxt, nxt_bytes, m, D, d, R,
                     s_a, s_win, s_cp, s_cd, s_cs, s_cw, s_wx, s_xo, s_zo, s_xp,
                     HAS_CB: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
                     PDL: tl.constexpr, PREFETCH: tl.constexpr, NEXT: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < m
    if PREFETCH > 0:
        prefetch_rows(w_in, rn, s_win, 0, D, PREFETCH)
    # The x programs read their slots' conv windows, the conv weights and bias before the wait:
    # the kernel before this one (the block's norm) does not write the pool, and only this kernel
    # does, a step earlier; the epilogue then waits on no memory read. One tile holds the w - 1
    # inputs (oldest first) and one the same shifted by one, what the window keeps.
    xn = rn < d  # all true in the x programs, all false in the z programs
    WP: tl.constexpr = triton.next_power_of_2(W - 1)
    jj = tl.arange(0, WP)
    slot = tl.load(idx + rm, mask=mm, other=0).to(tl.int64)
    base = cpool + slot[:, None, None] * s_cp + rn[None, :, None] * s_cd
    mw = mm[:, None, None] & xn[None, :, None]
    win = tl.load(base + jj[None, None, :] * s_cs, mask=mw & (jj < W - 1)[None, None, :], other=0.0)
    shf = tl.load(base + (jj + 1)[None, None, :] * s_cs, mask=mw & (jj + 1 < W - 1)[None, None, :], other=0.0)
    cwt = tl.load(cw + rn[:, None] * s_cw + jj[None, :], mask=xn[:, None] & (jj < W - 1)[None, :], other=0.0)
    cwl = tl.load(cw + rn * s_cw + (W - 1), mask=xn, other=0.0).to(tl.float32)
    cbv = tl.load(cb + rn, mask=xn, other=0.0).to(tl.float32) if HAS_CB else cwl * 0.0
    enter(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        mk = kk < D
        a = tl.load(a_in + rm[:, None] * s_a + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_in + rn[:, None] * s_win + kk[None, :], mask=mk[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(wt), acc)
    dt = x_out.dtype.element_ty
    y = acc.to(dt)  # in_proj's output rounding
    if pid * BLOCK_N >= d:
        tl.store(z_out + rm[:, None] * s_zo + (rn - d)[None, :], y, mask=mm[:, None])
        if NEXT > 0:  # the z programs are done: the next kernels' weights, during the x programs' epilogue
            prefetch_span(nxt, (pid - d // BLOCK_N).to(tl.int64) * NEXT, nxt_bytes, NEXT)
    else:
        # Conv update on these channels: window = [state (w - 1 inputs), x], then shift left by one.
        taps = win.to(dt).to(tl.float32) * cwt.to(tl.float32)[None, :, :]
        c = cwl[None, :] * y.to(tl.float32) + cbv[None, :] + tl.sum(taps, axis=2)
        new = tl.where((jj == W - 2)[None, None, :], y.to(cpool.dtype.element_ty)[:, :, None], shf)
        tl.store(base + jj[None, None, :] * s_cs, new, mask=mw & (jj < W - 1)[None, None, :])
        u = silu(c, False).to(dt)
        tl.store(x_out + rm[:, None] * s_xo + rn[None, :], u, mask=mm[:, None])
        rr = tl.arange(0, BLOCK_R)
        mr = rr < R
        wx = tl.load(w_x + rr[:, None] * s_wx + rn[None, :], mask=mr[:, None], other=0.0)
        part = tl.dot(u, tl.trans(wx))  # (BLOCK_M, BLOCK_R): these channels' share of x_proj
        tl.atomic_add(xp + rm[:, None] * s_xp + rr[None, :], part, mask=mm[:, None] & mr[None, :], sem="relaxed")


def mixer_in_triton(normed, in_weight, conv_state, conv_weight, conv_bias, state_indices, x_proj_weight, x_proj_out,
                    config=None, prefetch=None):
    """normed: (b, D) with b <= 16 and a unit last stride; in_weight (2d, D), x_proj_weight (R, d)
    with unit last strides; d a multiple of 16; conv_state (p, d, w - 1); x_proj_out (b, R) float32.
    ``config``: (BLOCK_N, BLOCK_K, stages, warps) instead of the default."""
    b, D = normed.shape
    d = in_weight.shape[0] // 2
    R, w = x_proj_weight.shape[0], conv_weight.shape[-1]
    assert in_weight.shape == (2 * d, D) and x_proj_weight.shape == (R, d) and conv_weight.shape == (d, w)
    assert b <= 16 and d % 16 == 0 and normed.stride(1) == 1 and in_weight.stride(1) == 1
    assert x_proj_weight.stride(1) == 1 and state_indices.shape == (b,)
    assert x_proj_out.dtype == torch.float32 and x_proj_out.shape == (b, R) and x_proj_out.stride(1) == 1
    x = torch.empty(b, d, device=normed.device, dtype=normed.dtype)
    z = torch.empty(b, d, device=normed.device, dtype=normed.dtype)
    # From the sweep in benchmarks/kernels.py (H100, 2.8B shapes); 16-channel blocks for other widths.
    block_n, block_k, stages, warps = config or ((32, 128, 3, 4) if b <= 4 else (64, 256, 4, 4))
    if config is None and in_weight.element_size() > 2:
        block_k //= 2  # fp32 weights: the same bytes per pipeline stage (the 16-bit tiles fill shared memory)
    if d % block_n:
        block_n = 16
    assert d % block_n == 0
    nxt, nxt_bytes, next_bytes = next_args(normed.device, prefetch, d // block_n, warps, normed)
    _mixer_in_kernel[(2 * d // block_n,)](
        normed, in_weight, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight,
        state_indices, x_proj_weight, x, z, x_proj_out, nxt, nxt_bytes, b, D, d, R,
        normed.stride(0), in_weight.stride(0), *conv_state.stride(), conv_weight.stride(0), x_proj_weight.stride(0),
        x.stride(0), z.stride(0), x_proj_out.stride(0),
        HAS_CB=conv_bias is not None, W=w, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(D)),
        BLOCK_R=max(16, triton.next_power_of_2(R)), STAGES=stages, num_warps=warps,
        NEXT=next_bytes, **pdl_args(normed.device, in_weight, PREFETCH_K))
    return x, z
