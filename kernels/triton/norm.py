"""Residual add + RMSNorm in Triton: one program per row, the whole row in registers.

Same contract and rounding as :func:`kernels.norm.add_rms_norm_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._pdl import enter, pdl_args


@triton.jit
def _normed(v, w, cols, m, D, eps):
    """RMSNorm of the stream ``v`` (float32, zero where not ``m``) times the weight, in float32."""
    h = v.to(w.dtype.element_ty).to(tl.float32)  # the reference rounds the stream to the weight dtype first
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    return h * rstd * tl.load(w + cols, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x, res, w, out, res_out, D, eps, s_x, s_r, s_o, s_ro,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    enter(PDL)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    v = tl.load(x + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(res + row * s_r + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(res_out + row * s_ro + cols, v, mask=m)
    tl.store(out + row * s_o + cols, _normed(v, w, cols, m, D, eps), mask=m)


def add_rms_norm_triton(x, residual, weight, eps: float = 1e-5, residual_fp32: bool = True):
    """x, residual: (..., D) with a contiguous last axis; weight: (D,)."""
    D = x.shape[-1]
    shape = x.shape
    x2 = x.reshape(-1, D)
    r2 = residual.reshape(-1, D) if residual is not None else x2
    if residual is not None and not residual_fp32:
        # Without an fp32 stream the sum is rounded to x.dtype before the norm, as in the reference.
        r2 = r2 + x2
        x2, residual = r2, None
    out = torch.empty(x2.shape, device=x.device, dtype=weight.dtype)
    res_out = torch.empty(x2.shape, device=x.device, dtype=torch.float32 if residual_fp32 else x.dtype)
    assert x2.stride(-1) == 1 and r2.stride(-1) == 1
    _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, D, eps, x2.stride(0), r2.stride(0),
                                         out.stride(0), res_out.stride(0), HAS_RES=residual is not None,
                                         BLOCK=triton.next_power_of_2(D), num_warps=8 if D >= 2048 else 4,
                                         **pdl_args(x.device))
    return out.view(shape), res_out.view(shape)


ZERO_BLOCK = 4096  # float32 elements of ``zero`` per program of the embedding kernel


@triton.jit
def _embed_rms_norm_kernel(ids, table, w, out, res_out, zero, n_zero, b, D, eps, s_id, s_t, s_o, s_ro,
                           BLOCK: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    enter(PDL)
    if pid < b:  # a row: gather, keep the stream, normalise
        cols = tl.arange(0, BLOCK)
        m = cols < D
        tok = tl.load(ids + pid * s_id).to(tl.int64)
        v = tl.load(table + tok * s_t + cols, mask=m, other=0.0).to(tl.float32)
        row = pid.to(tl.int64)
        tl.store(res_out + row * s_ro + cols, v, mask=m)
        tl.store(out + row * s_o + cols, _normed(v, w, cols, m, D, eps), mask=m)
    else:  # a block of the buffer to zero
        z = (pid - b).to(tl.int64) * ZB + tl.arange(0, ZB)
        tl.store(zero + z, tl.zeros((ZB,), tl.float32), mask=z < n_zero)


def embed_rms_norm_triton(ids, table, weight, eps: float = 1e-5, residual_fp32: bool = True, zero=None):
    """ids (b,); table (V, D) with a contiguous last axis; zero: a contiguous float32 buffer or None."""
    b, D = ids.shape[0], table.shape[1]
    assert table.stride(1) == 1 and ids.dim() == 1
    assert zero is None or (zero.dtype == torch.float32 and zero.is_contiguous())
    out = torch.empty(b, D, device=table.device, dtype=weight.dtype)
    res_out = torch.empty(b, D, device=table.device, dtype=torch.float32 if residual_fp32 else table.dtype)
    n_zero = zero.numel() if zero is not None else 0
    grid = (b + triton.cdiv(n_zero, ZERO_BLOCK),)
    _embed_rms_norm_kernel[grid](ids, table, weight, out, res_out, zero if zero is not None else res_out, n_zero, b, D,
                                 eps, ids.stride(0), table.stride(0), out.stride(0), res_out.stride(0),
                                 BLOCK=triton.next_power_of_2(D), ZB=ZERO_BLOCK, num_warps=8 if D >= 2048 else 4,
                                 **pdl_args(table.device))
    return out, res_out
