"""Decode step of the selective scan in Triton: one program per (channel block, sequence).

Reads the sequence's state rows from the pool at its slot index, applies the step in fp32,
writes them back in place, and fuses the dt bias + softplus, the D skip and the SiLU(z) gate.
Same contract as :func:`kernels.selective_scan.selective_state_update_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ssu_kernel(state, x, dt, A, B, C, D, z, dt_bias, out, idx,
                d, n, s_pool, s_d, s_n, s_xb, s_dtb, s_Ad, s_Bb, s_Cb, s_zb, s_ob,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    slot = tl.load(idx + b).to(tl.int64) if HAS_IDX else b.to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    md, mn = rd < d, rn < n
    m2 = md[:, None] & mn[None, :]
    hp = state + slot * s_pool + rd[:, None] * s_d + rn[None, :] * s_n
    h = tl.load(hp, mask=m2, other=0.0)
    xv = tl.load(x + b * s_xb + rd, mask=md, other=0.0).to(tl.float32)
    dtv = tl.load(dt + b * s_dtb + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dtv += tl.load(dt_bias + rd, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:  # torch's softplus: identity above 20
        dtv = tl.where(dtv <= 20.0, tl.log(1.0 + tl.exp(dtv)), dtv)
    a = tl.load(A + rd[:, None] * s_Ad + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    bv = tl.load(B + b * s_Bb + rn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C + b * s_Cb + rn, mask=mn, other=0.0).to(tl.float32)
    h = h * tl.exp(a * dtv[:, None]) + bv[None, :] * (dtv * xv)[:, None]
    tl.store(hp, h, mask=m2)
    y = tl.sum(h * cv[None, :], axis=1)
    if HAS_D:
        y += xv * tl.load(D + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z + b * s_zb + rd, mask=md, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(out + b * s_ob + rd, y, mask=md)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                  state_indices=None):
    """state: (p, d, n) float32, updated in place; x, dt, z: (b, d); A: (d, n); B, C: (b, n);
    D, dt_bias: (d,); state_indices: (b,) rows of the pool. Returns y: (b, d) in x.dtype."""
    b, d = x.shape
    n = A.shape[-1]
    assert state.dtype == torch.float32 and state.shape[1:] == (d, n), (state.dtype, state.shape)
    assert state_indices is not None or state.shape[0] == b
    A = A.contiguous()
    out = torch.empty_like(x)
    block_n = triton.next_power_of_2(n)
    block_d = max(16, min(64, 4096 // block_n))
    dummy = x  # unused pointer arguments must still be tensors
    grid = (triton.cdiv(d, block_d), b)
    _ssu_kernel[grid](state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                      dt_bias if dt_bias is not None else dummy, out,
                      state_indices if state_indices is not None else dummy,
                      d, n, state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0),
                      A.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0, out.stride(0),
                      HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                      SOFTPLUS=dt_softplus, HAS_IDX=state_indices is not None, BLOCK_D=block_d, BLOCK_N=block_n)
    return out
