"""y = x @ W^T for a few rows x, in Triton: one program per block of output features (and, for
the accumulating form, per slice of the reduction axis), streaming its rows of W through the K
loop (software-pipelined loads), the rows of x padded to 16 for the tensor-core dot. Same
contracts as :func:`kernels.linear.small_linear_ref` and :func:`kernels.linear.linear_accumulate_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._pdl import enter, next_args, pdl_args, prefetch_rows, prefetch_span

# Elements of each weight row's slice prefetched into L2 while the previous kernel finishes.
PREFETCH_K = 128


@triton.jit
def _small_linear_kernel(x, w, bias, y, nxt, nxt_bytes, m, n, k, k_split, s_xm, s_wn, s_ym,
                         HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                         PDL: tl.constexpr, PREFETCH: tl.constexpr, NEXT: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mn, mm = rn < n, rm < m
    k_lo = pid_k * k_split
    if PREFETCH > 0:
        prefetch_rows(w, tl.minimum(rn, n - 1), s_wn, k_lo, k, PREFETCH)
    enter(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_hi = tl.minimum(k_lo + k_split, k)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        mk = kk < k_hi
        wt = tl.load(w + rn[:, None] * s_wn + kk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        xt = tl.load(x + rm[:, None] * s_xm + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = y + rm[:, None] * s_ym + rn[None, :]
    if ACCUMULATE:  # slices of k land in the same outputs: fp32 atomics
        tl.atomic_add(out, acc, mask=mm[:, None] & mn[None, :], sem="relaxed")
    else:
        tl.store(out, acc, mask=mm[:, None] & mn[None, :])
    if NEXT > 0:  # the next kernel's weights, as this program's stream ends
        prefetch_span(nxt, (pid_k * tl.num_programs(0) + pid).to(tl.int64) * NEXT, nxt_bytes, NEXT)


def _config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, stages, warps) from the sweep in benchmarks/kernels.py (H100, 2.8B shapes):
    wide row blocks for the 50k-row LM head (2.6 TB/s vs cuBLAS 2.4), narrow ones for narrow outputs."""
    return (32 if n >= 8192 else 16), 256, 4, 4


def _launch(x, weight, bias, y, split, config, accumulate, prefetch=None):
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1 and x.stride(1) == 1 and m <= 16, (x.shape, weight.shape)
    block_n, block_k, stages, warps = config or _config(n, k)
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, k_split))
    nxt, nxt_bytes, next_bytes = next_args(x.device, prefetch, grid[0] * grid[1], warps, x)
    _small_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, y, nxt, nxt_bytes, m, n, k, k_split, x.stride(0),
        weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, ACCUMULATE=accumulate, BLOCK_M=16,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps, NEXT=next_bytes,
        **pdl_args(x.device, weight, min(PREFETCH_K, k_split)))
    return y


def small_linear_triton(x, weight, bias=None, config=None):
    """x: (m, k) with m <= 16 and a contiguous k axis; weight: (n, k) contiguous; bias: (n,)."""
    y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    return _launch(x, weight, bias, y, 1, config, False)


def linear_accumulate_triton(x, weight, out, split: int = 8, config=None, prefetch=None):
    """out (m, n) float32 += x @ weight^T, the reduction axis cut in ``split`` slices whose programs
    add their partial sums atomically: narrow outputs (few row blocks) still fill the GPU. The
    default (8 slices of 64-row blocks) won the sweep in benchmarks/kernels.py on out_proj."""
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], weight.shape[0]) and out.stride(1) == 1
    return _launch(x, weight, None, out, split, config or (64, 64, 4, 4), True, prefetch)
