"""Programmatic dependent launch for the decode step's kernels (Hopper and newer; triton >= 3.4).

A decode step at a few rows is a chain of ~260 short kernels, each bound by reading its
weights, and each pays for its launch and for the ramp-up of its first weight reads. With
programmatic dependent launch (``launch_pdl``), a kernel's programs may start once every
program of the kernel before it has signalled (``gdc_launch_dependents``), while that kernel
still runs. Each decode kernel here

1. asks L2 to prefetch the first part of its weight rows (weights never change, and a
   prefetch into L2, the point of coherence, cannot read stale data whatever runs);
2. waits for the previous kernel to complete (``gdc_wait``: all its writes visible);
3. then lets the next kernel start, which prefetches in turn.

Nothing is written before the wait, and every kernel waits before it completes, so when a
kernel starts, every kernel but the one just before it has completed, and when it passes its
wait, that one has too. So a kernel may read before its wait what the kernel just before it
does not write: ``mixer_in`` reads its slots' conv windows there (the block's norm runs before
it), and the state update, where its caller says so (``early``; in the decode step x_proj,
dt_proj or ``mixer_in`` runs before it), its slots' states, A, D, the dt bias and at one row
dt_proj's rows. Every other read comes after the wait. Kernels
launched without the attribute (torch's) serialise as usual. CUDA graphs keep the
dependencies as programmatic edges, so the captured decode step overlaps the same way.

Two kernels also prefetch ahead, after their wait (``prefetch_span``: bulk prefetches,
``cp.async.bulk.prefetch.L2``): out_proj's programs, as their weight stream ends, ask for the
first eighth of the next layer's in_proj (after the last layer, as many bytes from the start
of the LM head: 6.5 MB at the 2.8B shapes), which then lands while add + RMSNorm runs;
``mixer_in``'s z programs, once their rows are done, ask for the first eighth of out_proj.
Measured slower on an H100 (docs/performance.md): larger prefetches (before the wait, or
ahead), prefetching out_proj from the state update, and letting the short kernels between the
projections signal before their own wait, so that the next projection prefetches while the
previous one still streams; the prefetches then compete with the loads that the short kernels
wait on. ``PREFETCH_AHEAD = False`` turns the prefetch ahead off.

``VLMAMBA_PDL=0`` turns it off (the kernels then launch and run as plain kernels).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.triton._math import fast_math


PREFETCH_AHEAD = True  # read at launch: out_proj and mixer_in prefetch the next kernel's weights
PIECE = 16384  # bytes per bulk prefetch of the prefetch ahead


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: an NVIDIA GPU of
    compute capability 9.0 or newer, not the CPU interpreter, and not turned off."""
    if device.type != "cuda" or not fast_math() or os.environ.get("VLMAMBA_PDL", "1").lower() in ("0", "false", "off"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def prefetch_l2(ptrs):
    """Hint L2 to fetch the 128-byte lines holding ``ptrs`` (any shape); no result, no fault."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one start (no-ops without ``PDL``)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows(base, rows, row_stride, col0, ncols, COLS: tl.constexpr):
    """Prefetch ``COLS`` elements from column ``col0`` of each row in ``rows`` (valid row
    indices) of a row-major matrix, one hint per 128-byte line, clamped to ``ncols`` columns."""
    PER_LINE: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth
    LINES: tl.constexpr = COLS // PER_LINE
    cols = tl.minimum(col0 + tl.arange(0, LINES) * PER_LINE, ncols - 1)
    prefetch_l2(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :])


@triton.jit
def prefetch_span(base, start, total, NEXT: tl.constexpr, PIECE: tl.constexpr = PIECE):
    """Ask L2 to fetch bytes [start, start + NEXT) of ``base`` (clamped to ``total`` bytes) with
    one bulk prefetch (``cp.async.bulk.prefetch.L2``) per ``PIECE`` bytes, issued by the first
    threads of the program (so at most threads x PIECE bytes: 2 MB with 4 warps).
    ``start``, ``NEXT``, ``total`` and the address of ``base`` are multiples of 16."""
    n = tl.maximum(tl.minimum(total - start, NEXT), 0).to(tl.int32)
    p = base.to(tl.pointer_type(tl.int8)) + start
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t, o, r; .reg .u64 a;\n"
        "mov.u32 t, %tid.x; mul.lo.u32 o, t, $3; setp.lt.u32 p, o, $2;\n"
        "sub.u32 r, $2, o; min.u32 r, r, $3; cvt.u64.u32 a, o; add.u64 a, a, $1;\n"
        "@p cp.async.bulk.prefetch.L2.global [a], r;\nmov.u32 $0, 0; }",
        "=r,l,r,r", [p, n, PIECE], dtype=tl.int32, is_pure=False, pack=1)


def next_args(device: torch.device, nxt: torch.Tensor | None, programs: int, warps: int,
              dummy: torch.Tensor) -> tuple:
    """``(nxt, nxt_bytes, NEXT)`` for a kernel of ``programs`` programs of ``warps`` warps that
    prefetches ``nxt`` (the next kernel's weights, contiguous) into L2 after its wait, split
    evenly over its programs: NEXT bytes per program; 0 (and ``dummy`` for the pointer) where
    programmatic dependent launch is off or the span does not fit the bulk prefetches."""
    if nxt is None or not PREFETCH_AHEAD or not pdl(device) or not nxt.is_contiguous() or nxt.data_ptr() % 16:
        return dummy, 0, 0
    total = nxt.numel() * nxt.element_size()
    per = triton.cdiv(triton.cdiv(total, programs), 16) * 16
    if total % 16 or per > warps * 32 * PIECE:  # sizes are multiples of 16; one piece per thread
        return dummy, 0, 0
    return nxt, total, per


def pdl_args(device: torch.device, weight: torch.Tensor | None = None, prefetch: int = 0) -> dict:
    """Launch arguments of a kernel with ``PDL`` and ``PREFETCH`` constexprs: ``prefetch``
    elements of each weight row (rounded up to a power-of-two number of 128-byte lines; the
    kernel clamps them to the row), or none where programmatic dependent launch is off."""
    on = pdl(device)
    lines = 0
    if on and weight is not None and prefetch > 0:
        per_line = 128 // weight.element_size()
        lines = triton.next_power_of_2(triton.cdiv(prefetch, per_line)) * per_line
    return {"PDL": on, "PREFETCH": lines, "launch_pdl": on}
