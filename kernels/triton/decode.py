"""The decode step of a Mamba block at a few rows in two Triton kernels.

``mixer_in``: in_proj, conv update + SiLU and x_proj partial sums; same contract as
:func:`kernels.decode.mixer_in_ref`. One program per block of in_proj rows streams them through
the tensor-core dot against the few normalised rows. A block of z rows is stored; a block of x
rows runs the conv update on its channels' pool rows, applies SiLU and adds
``x @ x_proj[:, block]^T`` into the float32 output atomically.

``mixer_out``: dt_proj, the state update, D and the gate, then out_proj; same contract as
:func:`kernels.decode.mixer_out_ref`. One program per block of channels runs the state update on
them for every row, then streams out_proj's columns for those channels (every output, a slice of
the reduction) and adds its products into the float32 output atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._math import silu, softplus, ssm_step
from kernels.triton._pdl import enter, next_args, pdl_args, prefetch_rows, prefetch_span
from kernels.triton.linear import fit_stages
from kernels.triton.selective_state_update import _constants, _slot_state

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
    # Whole 64-layer decode steps at the 2.8B shapes replayed on an H100 (docs/performance.md):
    # 4 stages of 32 x 128 up to 8 rows (3 stages: 1-3 % slower at 1-8 rows), 64 x 256 beyond;
    # 16-channel blocks for other widths.
    block_n, block_k, stages, warps = config or ((32, 128, 4, 4) if b <= 8 else (64, 256, 4, 4))
    if config is None and in_weight.element_size() > 2:
        block_k //= 2  # fp32 weights: the same bytes per pipeline stage (the 16-bit tiles fill shared memory)
    if d % block_n:
        block_n = 16
    stages = fit_stages(normed.device, block_n * block_k * in_weight.element_size(), stages)
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


@triton.jit
def _ssm_row(state, hp, h, x, z, xp, wt, a, bias, dv, i, rd, rn, rr, md, mn, ms, r, n, s_x, s_z, s_xp):
    """Row i's step on these channels: dt = softplus(dt_proj(dt_low) + bias), the state update
    (stored where ``ms``), y = C.h + D x, gated by SiLU(z). Returns y (float32)."""
    lo = tl.load(xp + i * s_xp + rr, mask=rr < r, other=0.0)
    bv = tl.load(xp + i * s_xp + r + rn, mask=mn, other=0.0)
    cv = tl.load(xp + i * s_xp + r + n + rn, mask=mn, other=0.0)
    xv = tl.load(x + i * s_x + rd, mask=md, other=0.0).to(tl.float32)
    zv = tl.load(z + i * s_z + rd, mask=md, other=0.0).to(tl.float32)
    dtv = softplus(tl.sum(wt.to(tl.float32) * lo[None, :], axis=1) + bias, False)
    h, y = ssm_step(h, a, dtv, xv, bv, cv)
    tl.store(hp, h.to(state.dtype.element_ty), mask=ms)
    return (y + xv * dv) * silu(zv, False)


@triton.jit
def _mixer_out_kernel(state, idx, x, z, xp, A_log, Dp, dt_bias, w_dt, w_out, ys, out, nxt, nxt_bytes,
                      m, d, n, r, E, s_pool, s_d, s_n, s_x, s_z, s_xp, s_A, s_wd, s_wo, s_ys, s_out,
                      HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, ONE: tl.constexpr,
                      STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, PF_COLS: tl.constexpr,
                      NEXT: tl.constexpr):
    # One program per block of channels: the state update on them for every row, then their
    # share of out_proj (all E outputs by a K slice of BLOCK_C), added atomically.
    pid = tl.program_id(0)
    rd = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_S)
    rr = tl.arange(0, BLOCK_R)
    ro = tl.arange(0, BLOCK_O)
    md, mn = rd < d, rn < n
    m2 = md[:, None] & mn[None, :]
    # Before the wait, what the kernel just before (mixer_in) does not write: A, the dt bias, D,
    # dt_proj's rows, the first row's state, and an L2 prefetch of the first tile of out_proj.
    a, bias, dv = _constants(A_log, Dp, dt_bias, rd, rn, md, m2, s_A, HAS_D, HAS_BIAS, BLOCK_C)
    a = -tl.exp(a)
    wt = tl.load(w_dt + rd[:, None] * s_wd + rr[None, :], mask=md[:, None] & (rr < r)[None, :], other=0.0)
    hp, h = _slot_state(state, idx, 0, rd, rn, m2, s_pool, s_d, s_n, True)
    if PREFETCH:
        prefetch_rows(w_out, tl.minimum(ro, E - 1), s_wo, pid * BLOCK_C, d, PF_COLS)
    enter(PDL)
    dt = ys.dtype.element_ty
    y = _ssm_row(state, hp, h, x, z, xp, wt, a, bias, dv, 0, rd, rn, rr, md, mn, m2, r, n, s_x, s_z, s_xp)
    tiles = tl.cdiv(E, BLOCK_O)
    if ONE:  # one row: out_proj's products from registers, no round trip of y through memory
        yr = y.to(dt).to(w_out.dtype.element_ty).to(tl.float32)
        for t in tl.range(0, tiles, num_stages=STAGES):
            rows = t * BLOCK_O + ro
            mo = rows < E
            w = tl.load(w_out + rows[:, None] * s_wo + rd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
            tl.atomic_add(out + rows, tl.sum(w.to(tl.float32) * yr[None, :], axis=1), mask=mo, sem="relaxed")
    else:
        tl.store(ys + rd, y.to(dt), mask=md)
        for i in range(1, m):
            hp, h = _slot_state(state, idx, i, rd, rn, m2, s_pool, s_d, s_n, True)
            y = _ssm_row(state, hp, h, x, z, xp, wt, a, bias, dv, i, rd, rn, rr, md, mn, m2, r, n, s_x, s_z, s_xp)
            tl.store(ys + i * s_ys + rd, y.to(dt), mask=md)
        tl.debug_barrier()  # the y rows, stored by all of the program's threads, become the dot's operand
        rm = tl.arange(0, BLOCK_M)
        mm = rm < m
        yt = tl.load(ys + rm[:, None] * s_ys + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        for t in tl.range(0, tiles, num_stages=STAGES):
            rows = t * BLOCK_O + ro
            mo = rows < E
            w = tl.load(w_out + rows[:, None] * s_wo + rd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
            acc = tl.dot(yt.to(w.dtype), tl.trans(w))
            tl.atomic_add(out + rm[:, None] * s_out + rows[None, :], acc, mask=mm[:, None] & mo[None, :], sem="relaxed")
    if NEXT > 0:  # the next kernel's weights, as this program's stream ends
        prefetch_span(nxt, pid.to(tl.int64) * NEXT, nxt_bytes, NEXT)


def _mixer_out_config(b: int, itemsize: int, device) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_O, stages, warps): 80 programs at the 2.8B shapes (d = 5 120), each with
    32 KB tiles of out_proj in a deep pipeline, from whole decode steps replayed on an H100
    (docs/performance.md): 5 stages at one row, 4 at two; fewer where shared memory is smaller."""
    block_c, block_o, stages, warps = 64, 256, (5 if b == 1 else 4), 8
    return block_c, block_o, fit_stages(device, block_c * block_o * itemsize, stages), warps


def mixer_out_triton(state, x, z, x_proj_out, A_log, D, dt_bias, dt_proj_weight, state_indices, out_weight, out,
                     config=None, prefetch=None):
    """state: (p, d, n) float32 (or bfloat16 storage), updated in place at rows ``state_indices``
    (b,); x, z: (b, d) with b <= 16 and unit last strides; x_proj_out: (b, r + 2n) float32 sums
    (dt_low, B, C); A_log: (d, n); D, dt_bias: (d,) or None; dt_proj_weight: (d, r);
    out_weight: (E, d); out: (b, E) float32, to which y @ out_weight^T is added. ``config``:
    (BLOCK_C, BLOCK_O, stages, warps) instead of :func:`_mixer_out_config`'s."""
    b, d = x.shape
    n = A_log.shape[-1]
    r = dt_proj_weight.shape[1]
    E = out_weight.shape[0]
    assert state.shape[1:] == (d, n) and state_indices.shape == (b,) and b <= 16, (state.shape, b)
    assert x_proj_out.shape == (b, r + 2 * n) and x_proj_out.dtype == torch.float32 and x_proj_out.stride(1) == 1
    assert out_weight.shape == (E, d) and out_weight.stride(1) == 1 and dt_proj_weight.stride(1) == 1
    assert out.shape == (b, E) and out.dtype == torch.float32 and out.stride(1) == 1
    assert x.stride(1) == 1 and z.stride(1) == 1 and A_log.stride(1) == 1
    block_c, block_o, stages, warps = config or _mixer_out_config(b, out_weight.element_size(), x.device)
    block_c = min(block_c, triton.next_power_of_2(d))
    ys = torch.empty(b, d, device=x.device, dtype=x.dtype) if b > 1 else x  # y as the dot's operand (b > 1)
    grid = (triton.cdiv(d, block_c),)
    nxt, nxt_bytes, next_bytes = next_args(x.device, prefetch, grid[0], warps, x)
    pdl = pdl_args(x.device)
    _mixer_out_kernel[grid](
        state, state_indices, x, z, x_proj_out, A_log, D if D is not None else x,
        dt_bias if dt_bias is not None else x, dt_proj_weight, out_weight, ys, out, nxt, nxt_bytes,
        b, d, n, r, E, *state.stride(), x.stride(0), z.stride(0), x_proj_out.stride(0), A_log.stride(0),
        dt_proj_weight.stride(0), out_weight.stride(0), ys.stride(0), out.stride(0),
        HAS_D=D is not None, HAS_BIAS=dt_bias is not None, BLOCK_C=block_c, BLOCK_S=triton.next_power_of_2(n),
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_M=16, BLOCK_O=block_o, ONE=b == 1, STAGES=stages,
        num_warps=warps, NEXT=next_bytes, PDL=pdl["PDL"], PREFETCH=pdl["PDL"],
        PF_COLS=max(block_c, 128 // out_weight.element_size()), launch_pdl=pdl["launch_pdl"])
    return out
