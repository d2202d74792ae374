"""Matrix-vector products of the decode step: y = x @ W^T for a handful of rows.

At decode time the projections see a batch of a few rows, so they are bound by reading the
weight once from memory; BLAS libraries pick split-K schedules there that reach well under
the memory bandwidth on some shapes. Shapes: x (m, k), rounded to the weight's dtype first
(a float32 sum of partial products then enters as a 16-bit product would); weight (n, k) as
nn.Linear stores it; bias (n,) or None; y (m, n) in the weight's dtype.
"""

from __future__ import annotations

import torch.nn.functional as F

from kernels._backend import needs_grad, resolve_backend
from kernels.selective_scan import _triton_ops

MAX_ROWS = 16  # beyond this BLAS wins on most shapes; narrow products take more (``max_rows``)


def small_linear_ref(x, weight, bias=None):
    """x: (m, k); weight: (n, k); bias: (n,) or None -> (m, n) in weight.dtype (fp32 accumulation)."""
    return F.linear(x.to(weight.dtype), weight, bias)


def linear_accumulate_ref(x, weight, out, prefetch=None):
    """out (m, n) float32 += x @ weight^T (x: (m, k), weight: (n, k)); returns out. ``prefetch``
    (any contiguous tensor, e.g. the next kernel's weights) is a hint for the fast kernel, which
    asks L2 to fetch it as its own weight stream ends; it changes no result."""
    return out.add_(F.linear(x.to(weight.dtype), weight).float())


def _triton_runs(op: str, x, backend: str, grad: bool, max_rows: int | None = MAX_ROWS) -> bool:
    """Whether the Triton kernel of ``op`` runs: ``cuda`` means BLAS (cuBLAS), the peer here, and
    ``auto`` leaves more than ``max_rows`` rows (None: no limit) to it."""
    if backend == "cuda" or (backend == "auto" and max_rows is not None and x.shape[0] > max_rows):
        return False
    return resolve_backend(backend, op, x.device, None, _triton_ops(), grad) == "triton"


def linear_accumulate(x, weight, out, prefetch=None, backend: str = "auto", max_rows: int | None = MAX_ROWS):
    """``out += x @ W^T`` into a float32 buffer, for few rows; same contract as
    :func:`linear_accumulate_ref`. The Triton kernel splits the reduction axis across programs
    (atomic adds), which keeps narrow projections (the decode step's out_proj) at bandwidth;
    ``auto`` takes it up to ``max_rows`` rows (None: any number; the decode step's x_proj, 192
    features wide, passes None: cuBLAS leaves most of the GPU idle there)."""
    if _triton_runs("linear_accumulate", x, backend, needs_grad(x, weight), max_rows):
        from kernels.triton import linear_accumulate_triton

        return linear_accumulate_triton(x, weight, out, prefetch=prefetch)
    return linear_accumulate_ref(x, weight, out, prefetch)


def small_linear(x, weight, bias=None, backend: str = "auto", max_rows: int | None = MAX_ROWS):
    """``F.linear`` for few rows; same contract as :func:`small_linear_ref`.

    ``auto`` takes the Triton kernel on CUDA for m <= ``max_rows`` (None: any m) and BLAS
    otherwise; ``cuda`` means BLAS (cuBLAS), the peer for this op.
    """
    if _triton_runs("small_linear", x, backend, needs_grad(x, weight, bias), max_rows):
        from kernels.triton import small_linear_triton

        return small_linear_triton(x, weight, bias)
    return small_linear_ref(x, weight, bias)
