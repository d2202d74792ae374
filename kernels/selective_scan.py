"""Selective scan (Mamba-1, paper eqs. 2-3 with input-dependent delta, B, C).

Continuous parameters (delta, A, B) are discretised per step with zero-order hold on A
and Euler on B, as in Mamba-1:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (d, n)
    y_t = <h_t, C_t> + D * u_t,   then   y_t *= silu(z_t)          y: (d,)

Shapes (glossary in ``kernels/__init__.py``): u, delta, z (b, d, l); A (d, n);
B, C (b, n, l); D, delta_bias (d,); states (b, d, n) float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import needs_grad, peer_module, resolve_backend

TRITON_OPS: frozenset[str] = frozenset()


def _triton_ops() -> frozenset[str]:
    try:
        from kernels.triton import OPS
    except ImportError:
        return TRITON_OPS
    return OPS


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, lengths=None, state=None, state_indices=None):
    """Reference selective scan over a whole sequence, fp32 accumulation.

    u: (b, d, l) any float dtype; delta: (b, d, l); A: (d, n); B, C: (b, n, l);
    D: (d,) or None; z: (b, d, l) or None (gate y * silu(z)); delta_bias: (d,) or None;
    initial_state: (b, d, n) or None (zeros); lengths: (b,) or None — right-padded rows:
    steps at t >= lengths[i] get delta 0, so the state passes through them unchanged (y there
    is not meaningful); state: (p, d, n) float32 pool with state_indices (b,): start from
    those rows and write the final states back into them in place (instead of initial_state).
    Returns y: (b, d, l) in u.dtype and last_state: (b, d, n) float32, or None for it when
    ``state`` is given.
    """
    b, d, l = u.shape
    n = A.shape[-1]
    assert delta.shape == (b, d, l) and A.shape == (d, n), (delta.shape, A.shape)
    assert B.shape == (b, n, l) and C.shape == (b, n, l), (B.shape, C.shape)
    if state is not None:
        assert initial_state is None and state_indices is not None and state_indices.shape == (b,)
        initial_state = state[state_indices].float()
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if lengths is not None:
        delta = delta * _valid(lengths, l)[:, None, :]
    # Time-major and contiguous: each step's slice is one block, and unbind keeps autograd O(l), not O(l^2).
    dt, uT = delta.permute(2, 0, 1).contiguous(), u.permute(2, 0, 1)  # (l, b, d)
    BT, CT = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()  # (l, b, n)
    dA = torch.exp(dt[..., None] * A).unbind(0)  # l x (b, d, n)
    dBu = ((dt * uT)[..., None] * BT[:, :, None, :]).unbind(0)  # l x (b, d, n)
    h = u.new_zeros(b, d, n) if initial_state is None else initial_state.float().clone()
    hs = []
    for t in range(l):
        h = torch.addcmul(dBu[t], dA[t], h)  # dA_t * h + dBu_t: (b, d, n)
        hs.append(h)
    # y_t = <h_t, C_t> as one batched matmul: (l*b, d, n) @ (l*b, n, 1)
    y = torch.stack(hs).flatten(0, 1).bmm(CT.flatten(0, 1)[..., None]).view(l, b, d).permute(1, 2, 0) \
        if l else u.new_zeros(b, d, 0)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    if state is not None:
        state[state_indices] = h.to(state.dtype)
        return y.to(dtype_in), None
    return y.to(dtype_in), h


def _valid(lengths: torch.Tensor, l: int) -> torch.Tensor:
    """(b, l) float: 1 where t < lengths[i]."""
    return (torch.arange(l, device=lengths.device)[None, :] < lengths[:, None]).float()


def _scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, lengths, state):
    if initial_state is not None or state is not None:
        # mamba-ssm's Mamba-1 scan has no initial-state input; never pretend it does.
        from kernels._backend import BackendUnavailable

        raise BackendUnavailable("selective_scan: backend 'cuda' (mamba-ssm) cannot start from an initial_state")
    fn = peer_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    if lengths is not None:  # mamba-ssm has no lengths: apply bias, softplus and the mask here
        delta = delta.float() + (0 if delta_bias is None else delta_bias.float()[None, :, None])
        delta = (F.softplus(delta) if delta_softplus else delta) * _valid(lengths, u.shape[-1])[:, None, :]
        delta_bias, delta_softplus = None, False
    y, last = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return y, last.float()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, lengths=None, state=None, state_indices=None, backend: str = "auto"):
    """Selective scan over a whole sequence; same contract as :func:`selective_scan_ref`.

    Returns ``(y, last_state)``: y (b, d, l) in u.dtype, last_state (b, d, n) float32
    (None when ``state``/``state_indices`` name pool rows: the final states are written there).
    """
    chosen = resolve_backend(backend, "selective_scan", u.device, "mamba_ssm", _triton_ops(),
                             needs_grad(u, delta, A, B, C, D, z))
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, lengths, state)
    if chosen == "cuda":
        return _scan_cuda(*args)
    if chosen == "triton":
        from kernels.triton import selective_scan_triton

        return selective_scan_triton(*args, state_indices)
    return selective_scan_ref(*args, state_indices)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_indices=None, dt_proj_weight=None, A_is_log=False, early=False):
    """One recurrent step of the selective scan, updating ``state`` in place.

    state: (p, d, n) float32 pool; x: (b, d); dt: (b, d), or the low-rank (b, r) with
    dt_proj_weight (d, r) (dt = dt @ dt_proj_weight.T, fused in the fast kernel); A: (d, n),
    or A_log (d, n) with ``A_is_log`` (A = -exp(A_log)); B, C: (b, n); D: (d,) or None;
    z: (b, d) or None; dt_bias: (d,) or None; state_indices: (b,) int rows of the pool
    (None: row i for batch row i, p == b). Returns y: (b, d) in x.dtype.

    ``early`` is a hint for the fast kernel, true where the kernel launched just before this one
    does not write ``state`` (the decode step): the state rows and the constant inputs may then
    be read while that kernel still runs (programmatic dependent launch). It changes no result
    beyond float32 rounding: at one row the fast kernel then sums dt_proj's products as one tile.
    """
    if dt_proj_weight is not None:
        dt = dt.float() @ dt_proj_weight.float().T  # (b, d)
    if A_is_log:
        A = -torch.exp(A.float())
    b, d = x.shape
    n = A.shape[-1]
    assert dt.shape == (b, d) and B.shape == (b, n) and C.shape == (b, n), (dt.shape, B.shape, C.shape)
    if state_indices is None:
        assert state.shape == (b, d, n), state.shape
        h = state.float()
    else:
        assert state_indices.shape == (b,) and state.shape[1:] == (d, n), (state_indices.shape, state.shape)
        h = state[state_indices].float()  # (b, d, n)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[:, :, None] * A.float())  # (b, d, n)
    dBx = dt[:, :, None] * B.float()[:, None, :] * x.float()[:, :, None]  # (b, d, n)
    h = dA * h + dBx
    if state_indices is None:
        state.copy_(h)
    else:
        state[state_indices] = h.to(state.dtype)
    y = torch.einsum("bdn,bn->bd", h, C.float())
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_indices=None, dt_proj_weight=None, A_is_log=False, early=False, backend: str = "auto"):
    """One decode step in place on a state pool; same contract as :func:`selective_state_update_ref`."""
    chosen = resolve_backend(backend, "selective_state_update", x.device, "mamba_ssm", _triton_ops())
    if chosen == "cuda":
        if dt_proj_weight is not None:  # dt may be float32 sums (the decode step's x_proj buffer)
            dt = F.linear(dt.to(dt_proj_weight.dtype), dt_proj_weight)
        A = -torch.exp(A.float()) if A_is_log else A
        fn = peer_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
        return fn(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                  state_batch_indices=state_indices)
    if chosen == "triton":
        from kernels.triton import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices,
                                             dt_proj_weight, A_is_log, early)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices,
                                      dt_proj_weight, A_is_log, early)
