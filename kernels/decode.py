"""The in_proj, conv and x_proj of a Mamba block's decode step as one op, for a few rows.

    x, z = split(normed @ in_proj^T)
    x = silu(conv_update(x))                 # the slots' conv states shift in place
    x_proj_out += x @ x_proj^T               # float32, (b, r + 2n): dt_low, B, C

At a handful of rows every step is bound by reading weights, and between the projections sit
small element-wise kernels whose launches cost as much as their work. One Triton kernel does
all of it: each program streams its block of in_proj rows, runs the conv update on the x
channels it produced, and adds its channels' share of x_proj atomically into ``x_proj_out``.
(The block's RMSNorm stays a kernel of its own: recomputing it in every program re-read the
fp32 residual stream from L2 once per program, which cost more than the launch it saved; and
folding it into the weight stream, sums of squares in the loop and 1/rms applied to the dot's
sums, slowed the stream more: the dot's operand then comes from registers, docs/performance.md.)
The fast kernel reads the slots' conv windows before it waits for the kernel launched just
before it (programmatic dependent launch): that kernel must not write ``conv_state`` (in the
decode step it is the block's norm).
Shapes (glossary in ``kernels/__init__.py``, plus D = d_model, R = r + 2n): normed (b, D);
in_weight (2d, D); conv_state (p, d, w - 1) with state_indices (b,); x_proj_weight (R, d);
x_proj_out (b, R) float32, zeroed by the caller.
"""

from __future__ import annotations

import torch.nn.functional as F

from kernels._backend import BackendUnavailable, needs_grad, resolve_backend
from kernels.causal_conv1d import causal_conv1d_update_ref
from kernels.linear import MAX_ROWS, linear_accumulate_ref
from kernels.selective_scan import _triton_ops


def mixer_in_ref(normed, in_weight, conv_state, conv_weight, conv_bias, state_indices, x_proj_weight, x_proj_out,
                 prefetch=None):
    """Returns ``(x, z)``: x (b, d) after conv and SiLU, z (b, d), in normed's dtype (the fast
    kernel's caller must not launch it right after a kernel that writes ``conv_state``). Updates the
    ``conv_state`` rows and adds x's projection into ``x_proj_out`` in place. ``prefetch`` (a
    contiguous tensor, e.g. the start of out_proj's weight) is a hint for the fast kernel, whose
    z programs ask L2 to fetch it once their rows are done; it changes no result."""
    x, z = F.linear(normed, in_weight).chunk(2, dim=-1)
    x = causal_conv1d_update_ref(x, conv_state, conv_weight, conv_bias, "silu", state_indices)
    linear_accumulate_ref(x, x_proj_weight, x_proj_out)
    return x, z


def mixer_in_fusable(rows: int, d_inner: int, device, backend: str = "auto", grad: bool = False) -> bool:
    """Whether ``backend`` runs :func:`mixer_in` as the Triton kernel for these shapes (a few rows,
    channels in whole blocks of 16) on ``device``: the decode step then takes its fused form."""
    if rows > MAX_ROWS or d_inner % 16 or backend not in ("auto", "triton"):
        return False
    try:
        return resolve_backend(backend, "mixer_in", device, None, _triton_ops(), grad) == "triton"
    except BackendUnavailable:
        return False


def mixer_in(normed, in_weight, conv_state, conv_weight, conv_bias, state_indices, x_proj_weight, x_proj_out,
             prefetch=None, backend: str = "auto"):
    """Same contract as :func:`mixer_in_ref`; there is no peer kernel, so ``cuda`` runs the reference.
    The Triton kernel reads ``conv_state`` before it waits for the kernel launched just before it
    (module docstring): that kernel must not write ``conv_state``."""
    args = (normed, in_weight, conv_state, conv_weight, conv_bias, state_indices, x_proj_weight, x_proj_out)
    if backend != "cuda":
        chosen = resolve_backend(backend, "mixer_in", normed.device, None, _triton_ops(), needs_grad(normed, in_weight))
        if chosen == "triton":
            from kernels.triton import mixer_in_triton

            return mixer_in_triton(*args, prefetch=prefetch)
    return mixer_in_ref(*args, prefetch)
