"""Elementwise math for the Triton kernels, with a fast form for NVIDIA GPUs.

``tl.exp2`` and ``tl.log`` lower to ``ex2.approx.f32`` / ``lg2.approx.f32``, which keep
subnormal inputs and results: ptxas wraps every special-function instruction in a range test
and two scalings. The scan runs 19 of them per channel and step, so with ``FAST`` the kernels
use the flush-to-zero forms (a bare MUFU instruction; results below 2^-126 become 0, which
for a decaying state or a gate is no change at bf16 precision) and the gate's sigmoid becomes
one ``tanh.approx``. The interpreter (``TRITON_INTERPRET=1``) cannot run inline PTX, so
there ``FAST`` is off and the plain forms are used.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def fast_math() -> bool:
    """Whether kernels may use inline PTX (a GPU, not the interpreter)."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def softplus(x, FAST: tl.constexpr):
    """torch's softplus: log(1 + exp(x)), the identity above 20."""
    if FAST:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * LOG2E], dtype=tl.float32,
                                      is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                      is_pure=True, pack=1) * LN2
    else:
        s = tl.log(1.0 + tl.exp(x))
    return tl.where(x <= 20.0, s, x)


@triton.jit
def silu(x, FAST: tl.constexpr):
    """x * sigmoid(x); sigmoid(x) = 0.5 + 0.5 * tanh(x / 2) in the fast form."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return x * (0.5 + 0.5 * t)
    else:
        return x * tl.sigmoid(x)
