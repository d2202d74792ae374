"""Matrix-vector products of the decode step: y = x @ W^T for a handful of rows.

At decode time the projections see a batch of a few rows, so they are bound by reading the
weight once from memory; BLAS libraries pick split-K schedules there that reach well under
the memory bandwidth on some shapes. Shapes: x (m, k); weight (n, k) as nn.Linear stores it;
bias (n,) or None; y (m, n) in x.dtype.
"""

from __future__ import annotations

import torch.nn.functional as F

from kernels._backend import needs_grad, resolve_backend
from kernels.selective_scan import _triton_ops

MAX_ROWS = 16  # beyond this the product is no longer a weight read: BLAS wins


def small_linear_ref(x, weight, bias=None):
    """x: (m, k); weight: (n, k); bias: (n,) or None -> (m, n) in x.dtype (fp32 accumulation)."""
    return F.linear(x, weight, bias)


def linear_accumulate_ref(x, weight, out):
    """out (m, n) float32 += x @ weight^T (x: (m, k), weight: (n, k)); returns out."""
    return out.add_(F.linear(x, weight).float())


def linear_accumulate(x, weight, out, backend: str = "auto"):
    """``out += x @ W^T`` into a float32 buffer, for few rows; same contract as
    :func:`linear_accumulate_ref`. The Triton kernel splits the reduction axis across programs
    (atomic adds), which keeps narrow projections (the decode step's out_proj) at bandwidth."""
    if backend == "cuda" or (backend == "auto" and x.shape[0] > MAX_ROWS):
        return linear_accumulate_ref(x, weight, out)
    chosen = resolve_backend(backend, "linear_accumulate", x.device, None, _triton_ops(), needs_grad(x, weight))
    if chosen == "triton":
        from kernels.triton import linear_accumulate_triton

        return linear_accumulate_triton(x, weight, out)
    return linear_accumulate_ref(x, weight, out)


def small_linear(x, weight, bias=None, backend: str = "auto"):
    """``F.linear`` for few rows; same contract as :func:`small_linear_ref`.

    ``auto`` takes the Triton kernel on CUDA for m <= MAX_ROWS and BLAS otherwise; ``cuda``
    means BLAS (cuBLAS), the peer for this op.
    """
    if backend == "cuda" or (backend == "auto" and x.shape[0] > MAX_ROWS):
        return small_linear_ref(x, weight, bias)
    chosen = resolve_backend(backend, "small_linear", x.device, None, _triton_ops(), needs_grad(x, weight, bias))
    if chosen == "triton":
        from kernels.triton import small_linear_triton

        return small_linear_triton(x, weight, bias)
    return small_linear_ref(x, weight, bias)
