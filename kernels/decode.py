"""A Mamba block's decode step as two ops, for a few rows: :func:`mixer_in`

    x, z = split(normed @ in_proj^T)
    x = silu(conv_update(x))                 # the slots' conv states shift in place
    x_proj_out += x @ x_proj^T               # float32, (b, r + 2n): dt_low, B, C

and :func:`mixer_out`, the rest of the block

    y = selective_state_update(x, dt_proj(dt_low), B, C, z)   # the slots' states in place
    out += y @ out_proj^T                    # float32, (b, D)

At a handful of rows every step is bound by reading weights, and between the projections sit
small element-wise kernels whose launches cost as much as their work. One Triton kernel does
all of mixer_in: each program streams its block of in_proj rows, runs the conv update on the x
channels it produced, and adds its channels' share of x_proj atomically into ``x_proj_out``.
(The block's RMSNorm stays a kernel of its own: recomputing it in every program re-read the
fp32 residual stream from L2 once per program, which cost more than the launch it saved; and
folding it into the weight stream, sums of squares in the loop and 1/rms applied to the dot's
sums, slowed the stream more: the dot's operand then comes from registers, docs/performance.md.)
The fast kernel reads the slots' conv windows before it waits for the kernel launched just
before it (programmatic dependent launch): that kernel must not write ``conv_state`` (in the
decode step it is the block's norm).
:func:`mixer_out` gives each program of its kernel a block of channels: it runs the state
update on them for every row, then streams out_proj's columns for those channels (a slice of
the reduction) through a deep pipeline and adds its products atomically. At one or two rows
that replaces a kernel launch and a round trip of y (docs/performance.md); the decode step uses
it there (``model.mamba.MIXER_OUT_ROWS``). Its kernel reads the slots' states before its wait:
the kernel launched just before it must not write ``state`` (in the decode step, ``mixer_in``).
Shapes (glossary in ``kernels/__init__.py``, plus D = d_model, R = r + 2n): normed (b, D);
in_weight (2d, D); conv_state (p, d, w - 1) with state_indices (b,); x_proj_weight (R, d);
x_proj_out (b, R) float32, zeroed by the caller; state (p, d, n); out_weight (D, d); out (b, D)
float32.
"""

from __future__ import annotations

import torch.nn.functional as F

from kernels._backend import BackendUnavailable, needs_grad, resolve_backend
from kernels.causal_conv1d import causal_conv1d_update_ref
from kernels.linear import MAX_ROWS, linear_accumulate_ref
from kernels.selective_scan import _triton_ops, selective_state_update_ref


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


def mixer_out_ref(state, x, z, x_proj_out, A_log, D, dt_bias, dt_proj_weight, state_indices, out_weight, out,
                  prefetch=None):
    """The rest of the decode step after :func:`mixer_in`: the state update with dt_proj, softplus,
    D and the SiLU(z) gate (:func:`kernels.selective_scan.selective_state_update_ref`), then
    ``out += y @ out_weight^T`` (out (b, D) float32, y rounded to x's dtype first). x_proj_out
    holds the float32 sums (dt_low, B, C); the ``state`` rows at ``state_indices`` update in
    place. The fast kernel reads the states before it waits for the kernel launched just before
    it, which must not write ``state`` (in the decode step it is ``mixer_in``). ``prefetch``: a
    hint, as for :func:`mixer_in`. Returns ``out``."""
    r, n = dt_proj_weight.shape[1], A_log.shape[-1]
    dt_low, B, C = x_proj_out.split([r, n, n], dim=-1)
    y = selective_state_update_ref(state, x, dt_low, A_log, B, C, D, z, dt_bias, True, state_indices,
                                   dt_proj_weight, A_is_log=True)
    return linear_accumulate_ref(y, out_weight, out)


def mixer_out(state, x, z, x_proj_out, A_log, D, dt_bias, dt_proj_weight, state_indices, out_weight, out,
              prefetch=None, backend: str = "auto"):
    """Same contract as :func:`mixer_out_ref`; ``cuda`` runs the reference (no peer kernel)."""
    args = (state, x, z, x_proj_out, A_log, D, dt_bias, dt_proj_weight, state_indices, out_weight, out)
    if backend != "cuda":
        chosen = resolve_backend(backend, "mixer_out", x.device, None, _triton_ops(), needs_grad(x, out_weight))
        if chosen == "triton":
            from kernels.triton import mixer_out_triton

            return mixer_out_triton(*args, prefetch=prefetch)
    return mixer_out_ref(*args, prefetch)
