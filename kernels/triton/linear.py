"""y = x @ W^T for a few rows x, in Triton: one program per block of output features and block of
rows (and, for the accumulating form, per slice of the reduction axis), streaming its rows of W
through the K loop (software-pipelined loads), the rows of x padded to 16 for the tensor-core
dot and rounded to W's dtype. The programs of one block of features and its row blocks are
adjacent, so all but the first find W's block in L2. Same contracts as
:func:`kernels.linear.small_linear_ref` and :func:`kernels.linear.linear_accumulate_ref`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton._pdl import enter, next_args, pdl_args, prefetch_rows, prefetch_span

# Elements of each weight row's slice prefetched into L2 while the previous kernel finishes.
PREFETCH_K = 128


@triton.jit
def _small_linear_kernel(x, w, bias, y, nxt, nxt_bytes, m, n, k, k_split, s_xm, s_wn, s_ym,
                         HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, MB: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                         PDL: tl.constexpr, PREFETCH: tl.constexpr, NEXT: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid // MB * BLOCK_N + tl.arange(0, BLOCK_N)  # MB row blocks per block of features
    rm = pid % MB * BLOCK_M + tl.arange(0, BLOCK_M)
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
        acc = tl.dot(xt.to(wt.dtype), tl.trans(wt), acc)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = y + rm[:, None] * s_ym + rn[None, :]
    if ACCUMULATE:  # slices of k land in the same outputs: fp32 atomics
        tl.atomic_add(out, acc, mask=mm[:, None] & mn[None, :], sem="relaxed")
    else:
        tl.store(out, acc, mask=mm[:, None] & mn[None, :])
    if NEXT > 0:  # the next kernel's weights, as this program's stream ends
        prefetch_span(nxt, (pid_k * tl.num_programs(0) + pid).to(tl.int64) * NEXT, nxt_bytes, NEXT)


@functools.cache
def _shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def fit_stages(device: torch.device, stage_bytes: int, stages: int) -> int:
    """``stages`` pipeline stages of ``stage_bytes`` each, fewer (at least 2) where the GPU's
    shared memory per program holds fewer (with 8 KB to spare); as asked on the CPU."""
    if device.type != "cuda":
        return stages
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(2, min(stages, (_shared_memory(index) - 8192) // stage_bytes))


def _block_m(m: int) -> int:
    """Rows per program: all of up to 16 rows; beyond, blocks of 32 or 64."""
    return 16 if m <= 16 else min(64, triton.next_power_of_2(m))


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, stages, warps) from the sweeps in benchmarks/kernels.py (H100, 2.8B
    shapes): up to 16 rows, wide feature blocks for the 50k-row LM head (2.6 TB/s vs cuBLAS 2.4)
    and narrow ones for narrow outputs; beyond 16 rows (dt_proj: k = 160), short K steps."""
    if m > 16:
        return 64, (32 if k <= 256 else 64), 4, 4
    return (32 if n >= 8192 else 16), 256, 4, 4


def _accumulate_config(m: int, n: int) -> tuple[tuple[int, int, int, int], int]:
    """(config, slices of k) of the accumulating form. out_proj at a few rows: 128 x 128 tiles in
    a 5-stage pipeline, 8 warps, 4 slices of k (80 programs at the 2.8B shapes; whole decode
    steps replayed on an H100: 2.684 -> 2.625 ms at 4 rows, 3.092 -> 3.068 at 16, against 64-wide
    blocks in 8 slices, docs/performance.md). Narrow outputs (x_proj: 192 features): 64-wide
    blocks, 8 slices up to 16 rows, 32 up to 64 rows and 16 beyond."""
    if m <= 16 and n > 256:
        return (128, 128, 5, 8), 4
    return (64, 64, 4, 4), (8 if m <= 16 else 32 if m <= 64 else 16)


def _launch(x, weight, bias, y, split, config, accumulate, prefetch=None):
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1 and x.stride(1) == 1, (x.shape, weight.shape)
    block_n, block_k, stages, warps = config
    stages = fit_stages(x.device, block_n * block_k * weight.element_size(), stages)
    block_m = _block_m(m)
    mb = triton.cdiv(m, block_m)
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    grid = (triton.cdiv(n, block_n) * mb, triton.cdiv(k, k_split))
    nxt, nxt_bytes, next_bytes = next_args(x.device, prefetch, grid[0] * grid[1], warps, x)
    _small_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, y, nxt, nxt_bytes, m, n, k, k_split, x.stride(0),
        weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, ACCUMULATE=accumulate, MB=mb, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps, NEXT=next_bytes,
        **pdl_args(x.device, weight, min(PREFETCH_K, k_split)))
    return y


def small_linear_triton(x, weight, bias=None, config=None):
    """x: (m, k) with a contiguous k axis (rounded to the weight's dtype); weight: (n, k)
    contiguous; bias: (n,). Returns (m, n) in the weight's dtype. ``config``: (BLOCK_N, BLOCK_K,
    stages, warps) instead of :func:`_config`'s."""
    y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=weight.dtype)
    return _launch(x, weight, bias, y, 1, config or _config(x.shape[0], weight.shape[0], x.shape[1]), False)


def linear_accumulate_triton(x, weight, out, split: int | None = None, config=None, prefetch=None):
    """out (m, n) float32 += x @ weight^T, the reduction axis cut in ``split`` slices whose programs
    add their partial sums atomically: narrow outputs (few blocks of features) still fill the GPU.
    ``split`` and ``config`` (as for :func:`small_linear_triton`) default to
    :func:`_accumulate_config`'s."""
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], weight.shape[0]) and out.stride(1) == 1
    own, own_split = _accumulate_config(x.shape[0], weight.shape[0])
    return _launch(x, weight, None, out, split or own_split, config or own, True, prefetch)
