"""Decode step of the selective scan in Triton: one program per (channel block, sequence).

Reads the sequence's state rows from the pool at its slot index, applies the step in fp32,
writes them back in place, and fuses the dt bias + softplus, the D skip and the SiLU(z) gate.
Same contract as :func:`kernels.selective_scan.selective_state_update_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._math import silu, softplus, ssm_step
from kernels.triton._pdl import enter, pdl_args, prefetch_rows


@triton.jit
def _slot_state(state, idx, b, rd, rn, m2, s_pool, s_d, s_n, HAS_IDX: tl.constexpr):
    """The slot's state rows: their pointers and their values in float32."""
    slot = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)
    hp = state + slot * s_pool + rd[:, None] * s_d + rn[None, :] * s_n
    return hp, tl.load(hp, mask=m2, other=0.0).to(tl.float32)


@triton.jit
def _constants(A, D, dt_bias, rd, rn, md, m2, s_Ad, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A, the dt bias and D of these channels in float32 (zeros where absent)."""
    a = tl.load(A + rd[:, None] * s_Ad + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    zero = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.load(dt_bias + rd, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else zero
    dv = tl.load(D + rd, mask=md, other=0.0).to(tl.float32) if HAS_D else zero
    return a, bias, dv


@triton.jit
def _ssu_kernel(state, x, dt, A, B, C, D, z, dt_bias, out, idx, Wdt,
                d, n, r, s_pool, s_d, s_n, s_xb, s_dtb, s_Ad, s_Bb, s_Cb, s_zb, s_ob, s_wd,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_IDX: tl.constexpr, LOWRANK: tl.constexpr, A_IS_LOG: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EARLY: tl.constexpr,
                EARLY_W: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    md, mn = rd < d, rn < n
    m2 = md[:, None] & mn[None, :]
    if EARLY:
        # The caller vouches that the kernel before this one does not write the state (``early``),
        # and the kernels before that have completed: the slot's state, A, D, the dt bias (and at
        # 16-channel blocks dt_proj's rows, as one tile) are read before the wait, off the step's path.
        hp, h = _slot_state(state, idx, b, rd, rn, m2, s_pool, s_d, s_n, HAS_IDX)
        a, bias, dv = _constants(A, D, dt_bias, rd, rn, md, m2, s_Ad, HAS_D, HAS_BIAS, BLOCK_D)
        if LOWRANK and EARLY_W:
            rr = tl.arange(0, BLOCK_R)
            wt = tl.load(Wdt + rd[:, None] * s_wd + rr[None, :], mask=md[:, None] & (rr < r)[None, :], other=0.0)
    if PREFETCH > 0 and not (LOWRANK and EARLY_W):  # this block's dt_proj rows
        prefetch_rows(Wdt, tl.minimum(rd, d - 1), s_wd, 0, r, PREFETCH)
    enter(PDL)
    if not EARLY:
        hp, h = _slot_state(state, idx, b, rd, rn, m2, s_pool, s_d, s_n, HAS_IDX)
    xv = tl.load(x + b * s_xb + rd, mask=md, other=0.0).to(tl.float32)
    dtv = tl.zeros((BLOCK_D,), tl.float32)
    if LOWRANK and EARLY_W:
        rr = tl.arange(0, BLOCK_R)
        lo = tl.load(dt + b * s_dtb + rr, mask=rr < r, other=0.0).to(tl.float32)
        dtv += tl.sum(wt.to(tl.float32) * lo[None, :], axis=1)
    elif LOWRANK:  # dt = dt_proj(dt_low): (r,) @ (BLOCK_D, r)^T, fused here instead of a separate GEMM
        for r0 in range(0, r, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mr = rr < r
            lo = tl.load(dt + b * s_dtb + rr, mask=mr, other=0.0).to(tl.float32)
            wt = tl.load(Wdt + rd[:, None] * s_wd + rr[None, :], mask=md[:, None] & mr[None, :], other=0.0)
            dtv += tl.sum(wt.to(tl.float32) * lo[None, :], axis=1)
    else:
        dtv += tl.load(dt + b * s_dtb + rd, mask=md, other=0.0).to(tl.float32)
    if not EARLY:  # after dt's loads: measured faster with the low-rank form's 64-channel blocks (B=16)
        a, bias, dv = _constants(A, D, dt_bias, rd, rn, md, m2, s_Ad, HAS_D, HAS_BIAS, BLOCK_D)
    if HAS_BIAS:
        dtv += bias
    if SOFTPLUS:
        dtv = softplus(dtv, False)
    if A_IS_LOG:
        a = -tl.exp(a)
    bv = tl.load(B + b * s_Bb + rn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C + b * s_Cb + rn, mask=mn, other=0.0).to(tl.float32)
    h, y = ssm_step(h, a, dtv, xv, bv, cv)
    tl.store(hp, h, mask=m2)
    if HAS_D:
        y += xv * dv
    if HAS_Z:
        zv = tl.load(z + b * s_zb + rd, mask=md, other=0.0).to(tl.float32)
        y *= silu(zv, False)
    tl.store(out + b * s_ob + rd, y, mask=md)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                  state_indices=None, dt_proj_weight=None, A_is_log=False, early=False):
    """state: (p, d, n) float32 (or bfloat16 storage; the math is fp32), updated in place; x, z: (b, d); dt: (b, d), or (b, r) with
    dt_proj_weight (d, r); A: (d, n) (A_log with ``A_is_log``); B, C: (b, n) with unit stride
    along n; D, dt_bias: (d,); state_indices: (b,) rows of the pool. Returns y: (b, d) in x.dtype.
    ``early``: the kernel launched just before does not write ``state`` (see the reference)."""
    b, d = x.shape
    n = A.shape[-1]
    assert state.shape[1:] == (d, n), state.shape
    assert state_indices is not None or state.shape[0] == b
    assert B.stride(-1) == 1 and C.stride(-1) == 1 and dt.stride(-1) == 1 and x.stride(-1) == 1
    A = A.contiguous()
    lowrank = dt_proj_weight is not None
    r = dt_proj_weight.shape[1] if lowrank else 1
    out = torch.empty_like(x)
    block_n = triton.next_power_of_2(n)
    block_d = max(16, min(64, 4096 // block_n))
    dummy = x  # unused pointer arguments must still be tensors
    if lowrank:  # whole decode steps replayed on an H100: B=1 2.609 -> 2.524 ms with 16, B=16 3.270 -> 3.228 with 64
        block_d = 16 if b == 1 else 64 if b >= 16 else 32
    # Reads before the wait, whole decode steps replayed on an H100 with fp32 states
    # (docs/performance.md): B=1 2.527 -> 2.472 ms, 2.446 with dt_proj's tile; B=4 2.707 -> 2.667;
    # B=8 2.870 -> 2.827; B=256 9.140 -> 9.074. Slower with the low-rank form's 64-channel blocks
    # (B=16: 3.096 -> 3.302), and dt_proj's tile pays only at 16-channel blocks (B=4: 2.94 ms with 32).
    early = early and not (lowrank and block_d >= 64)
    early_w = early and lowrank and block_d == 16 and r <= 256
    block_r = triton.next_power_of_2(r) if early_w else 64
    grid = (triton.cdiv(d, block_d), b)
    _ssu_kernel[grid](state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                      dt_bias if dt_bias is not None else dummy, out,
                      state_indices if state_indices is not None else dummy,
                      dt_proj_weight if lowrank else dummy,
                      d, n, r, state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0),
                      A.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0, out.stride(0),
                      dt_proj_weight.stride(0) if lowrank else 0,
                      HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                      SOFTPLUS=dt_softplus, HAS_IDX=state_indices is not None, LOWRANK=lowrank, A_IS_LOG=A_is_log,
                      BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=block_r, EARLY=early, EARLY_W=early_w,
                      **pdl_args(x.device, dt_proj_weight, r if lowrank else 0))
    return out
