"""Residual add + RMSNorm, the pre-norm of every Mamba block, as one op.

Shapes (glossary in ``kernels/__init__.py``, plus D = d_model): x, residual (..., D);
weight (D,). The reference is the exact math of :class:`model.mamba.Block`: the residual
stream is summed (in fp32 when ``residual_fp32``), rounded to the weight's dtype, then
normalised in fp32.
"""

from __future__ import annotations

import torch

from kernels._backend import needs_grad, resolve_backend
from kernels.selective_scan import _triton_ops


def add_rms_norm_ref(x, residual, weight, eps: float = 1e-5, residual_fp32: bool = True):
    """x: (..., D); residual: (..., D) or None (first block); weight: (D,).

    Returns ``(normed, residual_out)``: normed (..., D) in weight.dtype; residual_out = residual + x
    (just x when residual is None) in fp32 if ``residual_fp32`` else in x.dtype.
    """
    res = x if residual is None else residual + x
    h = res.to(weight.dtype).float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(weight.dtype)
    return normed, (res.float() if residual_fp32 else res)


def add_rms_norm(x, residual, weight, eps: float = 1e-5, residual_fp32: bool = True, backend: str = "auto"):
    """Residual add + RMSNorm; same contract as :func:`add_rms_norm_ref`. There is no peer kernel
    with this exact rounding, so ``cuda`` runs the reference."""
    if backend == "cuda":
        return add_rms_norm_ref(x, residual, weight, eps, residual_fp32)
    chosen = resolve_backend(backend, "add_rms_norm", x.device, None, _triton_ops(), needs_grad(x, residual, weight))
    if chosen == "triton":
        from kernels.triton import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, residual_fp32)
    return add_rms_norm_ref(x, residual, weight, eps, residual_fp32)


def embed_rms_norm_ref(ids, table, weight, eps: float = 1e-5, residual_fp32: bool = True, zero=None):
    """The first block's pre-norm straight from token ids: ``add_rms_norm_ref(table[ids], None,
    weight, eps, residual_fp32)``. ids (b,) long, valid rows of table (V, D). ``zero``: a float32
    buffer set to zero on the way (the decode step's sums), or None."""
    if zero is not None:
        zero.zero_()
    return add_rms_norm_ref(table[ids], None, weight, eps, residual_fp32)


def embed_rms_norm(ids, table, weight, eps: float = 1e-5, residual_fp32: bool = True, zero=None,
                   backend: str = "auto"):
    """Same contract as :func:`embed_rms_norm_ref`: the decode step's first kernel at a few rows
    (the gather, the memset and the norm were three, each a few microseconds at one row);
    ``cuda`` runs the reference."""
    if backend != "cuda":
        chosen = resolve_backend(backend, "embed_rms_norm", table.device, None, _triton_ops(),
                                 needs_grad(table, weight))
        if chosen == "triton":
            from kernels.triton import embed_rms_norm_triton

            return embed_rms_norm_triton(ids, table, weight, eps, residual_fp32, zero)
    return embed_rms_norm_ref(ids, table, weight, eps, residual_fp32, zero)
