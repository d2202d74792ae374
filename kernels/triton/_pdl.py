"""Programmatic dependent launch (Hopper and later) for the decode step's kernels.

A kernel launched with ``launch_pdl`` may start while the kernel before it on the stream is
still running: its programs are scheduled and run their prologue early, then wait in
``gdc_wait`` until the previous kernel has finished and its writes are visible. Each of our
kernels waits before it touches any activation or state and only then lets the next kernel
launch, so the order of every read and write is the same as without it; what overlaps is the
launch and ramp-up of one kernel with the tail of the one before. In a decode step of a few
rows (about 260 short kernels per token for the 2.8B model) those gaps are a large share of
the time. Off under the interpreter, before sm_90, with triton releases that lack it, and
with ``VLMAMBA_PDL=0``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _supported(device_index: int) -> bool:
    if gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking ``USE_PDL``: PDL on where this device and triton have it."""
    if t.is_cuda and os.environ.get("VLMAMBA_PDL", "1") != "0" and _supported(t.device.index or 0):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's results, then let the next kernel launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
