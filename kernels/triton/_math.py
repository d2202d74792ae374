"""Elementwise math for the Triton kernels, with a fast form for NVIDIA GPUs.

``tl.exp2`` and ``tl.log`` lower to ``ex2.approx.f32`` / ``lg2.approx.f32``, which keep
subnormal inputs and results: ptxas wraps every special-function instruction in a range test
and two scalings, and ``tl.sigmoid`` divides. The prefill scan runs 19 special functions per
channel and step, so with ``FAST`` the kernels use the flush-to-zero forms (a bare MUFU
instruction; results below 2^-126 become 0: a decay factor exp(dt * A) that small, or the
1 + e^x of a softplus, changes nothing at fp32) and compute the sigmoid of SiLU as
0.5 + 0.5 * tanh.approx(x / 2). The PTX bound on tanh.approx is 2^-11 relative, so the
sigmoid is within 2^-12 absolute: below bf16 rounding where the sigmoid is large, while in the
far negative tail (sigmoid of a few 1e-3 and less) it keeps only absolute, not relative,
accuracy. Measured on the 2.8B shape, the model's logits stay within 0.047 of the reference
path, as mamba-ssm's do (docs/performance.md).
The CPU interpreter cannot run inline PTX, and AMD GPUs have none, so there ``FAST`` is off
and the plain forms are used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._backend import _interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def fast_math() -> bool:
    """Whether kernels may use inline PTX: an NVIDIA GPU, not the interpreter or ROCm."""
    return not _interpreting() and torch.version.hip is None


@triton.jit
def _ptx(x, ASM: tl.constexpr):
    """One fp32 PTX instruction, ``ASM`` with $0 = result and $1 = x."""
    return tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def exp2(x, FAST: tl.constexpr):
    x = x.to(tl.float32)
    if FAST:
        return _ptx(x, "ex2.approx.ftz.f32 $0, $1;")
    else:
        return tl.exp2(x)


@triton.jit
def softplus(x, FAST: tl.constexpr):
    """torch's softplus: log(1 + exp(x)), the identity above 20."""
    x = x.to(tl.float32)
    if FAST:
        s = _ptx(1.0 + exp2(x * LOG2E, FAST), "lg2.approx.ftz.f32 $0, $1;") * LN2
    else:
        s = tl.log(1.0 + tl.exp(x))
    return tl.where(x <= 20.0, s, x)


@triton.jit
def silu(x, FAST: tl.constexpr):
    """x * sigmoid(x); sigmoid(x) = 0.5 + 0.5 * tanh(x / 2) in the fast form."""
    x = x.to(tl.float32)
    if FAST:
        return x * (0.5 + 0.5 * _ptx(0.5 * x, "tanh.approx.f32 $0, $1;"))
    else:
        return x * tl.sigmoid(x)


@triton.jit
def ssm_step(h, a, dt, x, b, c):
    """One decode step of the selective scan on a block of channels, in float32: h (channels,
    n) becomes exp(dt A) h + dt x B; returns (h, C.h). The decode kernels' shared math (the
    state update alone and fused into ``mixer_out``)."""
    h = h * tl.exp(a * dt[:, None]) + b[None, :] * (dt * x)[:, None]
    return h, tl.sum(h * c[None, :], axis=1)
