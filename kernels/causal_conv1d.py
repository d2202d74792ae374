"""Causal depthwise conv1d, the short convolution in front of Mamba's selective scan.

Shapes (glossary in ``kernels/__init__.py``): x (b, d, l); weight (d, w); bias (d,);
conv states (b, d, w - 1) hold the last w - 1 inputs, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import BackendUnavailable, peer_module, resolve_backend
from kernels.selective_scan import _triton_ops

_ACTIVATIONS = (None, "silu", "swish")


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return F.silu(y) if activation else y


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_state=None):
    """Reference causal depthwise conv1d over a sequence, fp32 accumulation.

    x: (b, d, l); weight: (d, w); bias: (d,) or None; activation: None | "silu" | "swish";
    initial_state: (b, d, w - 1) inputs before x (None: zeros).
    Returns y: (b, d, l) in x.dtype and conv_state: (b, d, w - 1) in x.dtype, the last w - 1
    inputs of [initial_state, x].
    """
    b, d, l = x.shape
    w = weight.shape[-1]
    assert weight.shape == (d, w), weight.shape
    if initial_state is None:
        initial_state = x.new_zeros(b, d, w - 1)
    assert initial_state.shape == (b, d, w - 1), initial_state.shape
    xs = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (b, d, w - 1 + l)
    y = F.conv1d(xs.float(), weight.float()[:, None, :], None if bias is None else bias.float(), groups=d)
    return _act(y, activation).to(x.dtype), xs[:, :, xs.shape[-1] - (w - 1):].clone()


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, backend: str = "auto"):
    """Causal depthwise conv1d; same contract as :func:`causal_conv1d_ref`."""
    chosen = resolve_backend(backend, "causal_conv1d", x.device, "causal_conv1d", _triton_ops())
    if chosen == "cuda":
        fn = peer_module("causal_conv1d").causal_conv1d_fn
        if initial_state is not None:
            # causal-conv1d takes initial states only with channel-last x.
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
            initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
        y, state = fn(x, weight, bias, initial_states=initial_state, return_final_states=True,
                      activation=activation)
        return y, state
    if chosen == "triton":
        from kernels.triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, initial_state)
    return causal_conv1d_ref(x, weight, bias, activation, initial_state)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    """One step of the causal conv, shifting ``x`` into ``conv_state`` in place.

    x: (b, d); conv_state: (p, d, w - 1) pool; weight: (d, w); bias: (d,) or None;
    state_indices: (b,) int rows of the pool (None: row i for batch row i, p == b).
    Returns y: (b, d) in x.dtype.
    """
    b, d = x.shape
    w = weight.shape[-1]
    rows = conv_state if state_indices is None else conv_state[state_indices]  # (b, d, w - 1)
    assert rows.shape == (b, d, w - 1), (rows.shape, (b, d, w - 1))
    window = torch.cat([rows.to(x.dtype), x[:, :, None]], dim=-1)  # (b, d, w)
    y = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    new_rows = window[:, :, 1:].to(conv_state.dtype)
    if state_indices is None:
        conv_state.copy_(new_rows)
    else:
        conv_state[state_indices] = new_rows
    return _act(y, activation).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, state_indices=None,
                         backend: str = "auto"):
    """One decode step of the causal conv in place on a pool; contract of :func:`causal_conv1d_update_ref`."""
    chosen = resolve_backend(backend, "causal_conv1d_update", x.device, "causal_conv1d", _triton_ops())
    if chosen == "cuda":
        fn = peer_module("causal_conv1d").causal_conv1d_update
        try:
            return fn(x, conv_state, weight, bias, activation, conv_state_indices=state_indices)
        except TypeError as e:  # releases before 1.4 lack pool indices
            raise BackendUnavailable(f"causal_conv1d_update: installed causal-conv1d lacks indices: {e}") from e
    if chosen == "triton":
        from kernels.triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation, state_indices)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, state_indices)
