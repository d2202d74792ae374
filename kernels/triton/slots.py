"""Decode-step slot routing in one short kernel (contract: :func:`kernels.slots.route_slots_ref`).

One program per block of rows. Live rows have distinct slots, so each flag is read and written
by one row; padding rows (at ``scratch``) store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(ids, slots, ended, end_ids, out, b, scratch, s_e, K: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < b
    s = tl.load(slots + r, mask=m, other=scratch)
    t = tl.load(ids + r, mask=m, other=-2)
    was = tl.load(ended + s, mask=m, other=0) != 0
    hit = tl.zeros((BLOCK,), tl.int1)
    for k in tl.static_range(K):
        e = tl.load(end_ids + s * s_e + k, mask=m, other=-1)
        hit = hit | ((e == t) & (e >= 0))
    tl.store(ended + s, was | hit, mask=m & (s != scratch))
    tl.store(out + r, tl.where(was, scratch, s), mask=m)


def route_slots_triton(ids: torch.Tensor, slots: torch.Tensor, ended: torch.Tensor, end_ids: torch.Tensor,
                       scratch: int) -> torch.Tensor:
    b = slots.shape[0]
    assert ids.shape == slots.shape and ended.dtype == torch.bool and end_ids.stride(1) == 1
    out = torch.empty_like(slots)
    block = max(16, min(256, triton.next_power_of_2(b)))
    _route_kernel[(triton.cdiv(b, block),)](ids, slots, ended, end_ids, out, b, scratch, end_ids.stride(0),
                                            K=end_ids.shape[1], BLOCK=block)
    return out
