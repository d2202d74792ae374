"""Causal depthwise conv1d, the short convolution in front of Mamba's selective scan.

Shapes (glossary in ``kernels/__init__.py``): x (b, d, l); weight (d, w); bias (d,);
conv states (b, d, w - 1) hold the last w - 1 inputs, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import BackendUnavailable, needs_grad, peer_module, resolve_backend
from kernels.selective_scan import _triton_ops

_ACTIVATIONS = (None, "silu", "swish")


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return F.silu(y) if activation else y


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_state=None, lengths=None,
                      conv_state=None, state_indices=None):
    """Reference causal depthwise conv1d over a sequence, fp32 accumulation.

    x: (b, d, l); weight: (d, w); bias: (d,) or None; activation: None | "silu" | "swish";
    initial_state: (b, d, w - 1) inputs before x (None: zeros); lengths: (b,) or None — the
    valid steps of right-padded rows (the new state ends at each row's length);
    conv_state: (p, d, w - 1) pool with state_indices (b,): start from those rows and write
    the new states back into them in place (instead of initial_state).
    Returns y: (b, d, l) in x.dtype and the new state: (b, d, w - 1) in x.dtype, the last
    w - 1 inputs of [initial_state, x[:length]] — or None for it when ``conv_state`` is given.
    """
    b, d, l = x.shape
    w = weight.shape[-1]
    assert weight.shape == (d, w), weight.shape
    if conv_state is not None:
        assert initial_state is None and state_indices is not None and state_indices.shape == (b,)
        initial_state = conv_state[state_indices]
    if initial_state is None:
        initial_state = x.new_zeros(b, d, w - 1)
    assert initial_state.shape == (b, d, w - 1), initial_state.shape
    xs = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (b, d, w - 1 + l)
    y = F.conv1d(xs.float(), weight.float()[:, None, :], None if bias is None else bias.float(), groups=d)
    new = _state_at(xs, lengths if lengths is not None else torch.full((b,), l, device=x.device), w)
    if conv_state is not None:
        conv_state[state_indices] = new.to(conv_state.dtype)
        return _act(y, activation).to(x.dtype), None
    return _act(y, activation).to(x.dtype), new


def _state_at(xs: torch.Tensor, lengths: torch.Tensor, w: int) -> torch.Tensor:
    """The w - 1 inputs ending at each row's length. xs: (b, d, w - 1 + l) -> (b, d, w - 1)."""
    b, d, _ = xs.shape
    idx = lengths.to(xs.device)[:, None] + torch.arange(w - 1, device=xs.device)[None, :]  # (b, w - 1)
    return xs.gather(2, idx[:, None, :].expand(b, d, w - 1))


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, lengths=None, conv_state=None,
                  state_indices=None, backend: str = "auto"):
    """Causal depthwise conv1d; same contract as :func:`causal_conv1d_ref`."""
    chosen = resolve_backend(backend, "causal_conv1d", x.device, "causal_conv1d", _triton_ops(),
                             needs_grad(x, weight, bias))
    if chosen == "triton" and backend == "auto" and not 2 <= weight.shape[-1] <= 4:
        chosen = "ref"  # the Triton kernel keeps at most three past inputs in registers
    if chosen == "cuda":
        return _conv_cuda(x, weight, bias, activation, initial_state, lengths, conv_state, state_indices)
    if chosen == "triton":
        from kernels.triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, initial_state, lengths, conv_state, state_indices)
    return causal_conv1d_ref(x, weight, bias, activation, initial_state, lengths, conv_state, state_indices)


def _conv_cuda(x, weight, bias, activation, initial_state, lengths, conv_state, state_indices):
    """causal-conv1d's kernel; pool rows and ragged lengths are handled around it."""
    fn = peer_module("causal_conv1d").causal_conv1d_fn
    if conv_state is not None:
        initial_state = conv_state[state_indices]
    if initial_state is not None:
        # causal-conv1d takes initial states only with channel-last x.
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
    y, new = fn(x, weight, bias, initial_states=initial_state, return_final_states=True, activation=activation)
    if lengths is not None:
        w = weight.shape[-1]
        init = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[1], w - 1)
        new = _state_at(torch.cat([init.to(x.dtype), x], dim=-1), lengths, w)
    if conv_state is not None:
        conv_state[state_indices] = new.to(conv_state.dtype)
        return y, None
    return y, new


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
