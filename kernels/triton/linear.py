"""y = x @ W^T for a few rows x, in Triton: one program per block of output features, streaming
its rows of W through the K loop (software-pipelined loads), the rows of x padded to 16 for
the tensor-core dot. Same contract as :func:`kernels.linear.small_linear_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _small_linear_kernel(x, w, bias, y, m, n, k, s_xm, s_wn, s_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mn, mm = rn < n, rm < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        mk = kk < k
        wt = tl.load(w + rn[:, None] * s_wn + kk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        xt = tl.load(x + rm[:, None] * s_xm + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rm[:, None] * s_ym + rn[None, :], acc, mask=mm[:, None] & mn[None, :])


def _config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, stages, warps) from the sweep in benchmarks/kernels.py (H100, 2.8B shapes):
    wide row blocks for the 50k-row LM head (2.6 TB/s vs cuBLAS 2.4), narrow ones for narrow outputs."""
    return (32 if n >= 8192 else 16), 256, 4, 4


def small_linear_triton(x, weight, bias=None, config=None):
    """x: (m, k) with m <= 16 and a contiguous k axis; weight: (n, k) contiguous; bias: (n,)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1 and x.stride(1) == 1 and m <= 16, (x.shape, weight.shape)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_n, block_k, stages, warps = config or _config(n, k)
    _small_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return y
