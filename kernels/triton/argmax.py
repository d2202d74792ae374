"""Masked argmax over the vocabulary in two short kernels: the rows cut into chunks, one program
per (row, chunk) finds its chunk's first maximum, then one program per row picks among them.

Same contract as :func:`kernels.argmax.masked_argmax_ref`. A NaN beats every number and the first
NaN stays, as in ``torch.argmax``. Masked ids are written as -inf where they lie. One program
per row streaming a 50k row chunk after chunk waits on each chunk's loads in turn: 13 round
trips to L2, slower than torch's argmax; the chunks' programs issue theirs at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._pdl import enter, pdl_args

CHUNK = 2048  # elements per program of the first kernel (25 programs per row of a 50k vocabulary)


@triton.jit
def _first_max(v, idx, INVALID):
    """(value, index) of the first maximum of ``v`` (NaN above every number; index INVALID if empty)."""
    nan = v != v
    top = tl.max(tl.where(nan, float("-inf"), v), axis=0)
    first = tl.min(tl.where(v == top, idx, INVALID), axis=0)
    first_nan = tl.min(tl.where(nan, idx, INVALID), axis=0)
    has_nan = first_nan < INVALID
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first)


@triton.jit
def _chunk_max_kernel(logits, mask, part_v, part_i, V, P, s_l, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr, PREFETCH: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = chunk * BLOCK + tl.arange(0, BLOCK)
    inb = c < V
    if HAS_MASK:
        drop = tl.load(mask + c, mask=inb, other=0) != 0  # constant: read before the wait
    enter(PDL)  # the logits come from the kernel just before
    ptr = logits + row * s_l + c
    v = tl.load(ptr, mask=inb, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        tl.store(ptr, tl.full((BLOCK,), float("-inf"), tl.float32).to(logits.dtype.element_ty), mask=inb & drop)
        v = tl.where(drop, float("-inf"), v)
    top, first = _first_max(v, tl.where(inb, c, V), V)
    tl.store(part_v + row * P + chunk, top)
    tl.store(part_i + row * P + chunk, tl.minimum(first, V - 1))  # an all -inf chunk: its first index is fine


@triton.jit
def _row_max_kernel(part_v, part_i, out, V, P, BLOCK_P: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_P)
    enter(PDL)
    v = tl.load(part_v + row * P + j, mask=j < P, other=float("-inf"))
    i = tl.load(part_i + row * P + j, mask=j < P, other=V)
    _, first = _first_max(v, i, V)
    tl.store(out + row, tl.minimum(first, V - 1).to(out.dtype.element_ty))


def masked_argmax_triton(logits: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None):
    b, V = logits.shape
    assert logits.stride(1) == 1 and V < 2**31
    assert mask is None or (mask.shape == (V,) and mask.dtype == torch.bool and mask.is_contiguous())
    if out is None:
        out = torch.empty(b, device=logits.device, dtype=torch.long)
    assert out.shape == (b,) and out.is_contiguous()
    P = triton.cdiv(V, CHUNK)
    part_v = torch.empty(b, P, device=logits.device, dtype=torch.float32)
    part_i = torch.empty(b, P, device=logits.device, dtype=torch.int32)
    pdl = pdl_args(logits.device)
    _chunk_max_kernel[(b, P)](logits, mask.view(torch.uint8) if mask is not None else logits, part_v, part_i, V, P,
                              logits.stride(0), HAS_MASK=mask is not None, BLOCK=CHUNK, num_warps=4, **pdl)
    _row_max_kernel[(b,)](part_v, part_i, out, V, P, BLOCK_P=max(16, triton.next_power_of_2(P)), num_warps=1, **pdl)
    return out
