"""Explicit backend choice for every op: ``auto | cuda | triton | ref``.

``cuda`` means the peer libraries mamba-ssm / causal-conv1d, ``triton`` our own kernels,
``ref`` the PyTorch reference. Asking for a backend that cannot run raises
:class:`BackendUnavailable`; nothing falls back silently. ``auto`` picks the fastest
backend available for the tensors' device and logs that choice once per op.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "triton", "ref")


class BackendUnavailable(RuntimeError):
    """The requested kernel backend cannot run here (missing package or wrong device)."""


@functools.cache
def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def peer_module(name: str):
    """Import one of the optional peer packages (``mamba_ssm``, ``causal_conv1d``) or return None."""
    return _module(name)


def triton_available() -> bool:
    return _module("triton") is not None and _module("kernels.triton") is not None


def _check(backend: str, op: str, device: torch.device, peer: str | None) -> None:
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f"{op}: backend 'cuda' needs CUDA tensors, got {device.type}")
        if peer is None or peer_module(peer) is None:
            raise BackendUnavailable(
                f"{op}: backend 'cuda' needs the package '{peer}' (pip install 'vlmamba-serve[cuda]')"
            )
    elif backend == "triton":
        if not triton_available():
            raise BackendUnavailable(f"{op}: backend 'triton' is not available (no triton kernels for this op)")
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailable(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, true, on, ...)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no triton, or one without knobs
        import os

        return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


_logged: set[str] = set()


def needs_grad(*tensors) -> bool:
    """True when autograd will record an op on these tensors (training, not inference)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, op: str, device: torch.device, peer: str | None = None,
                    triton_ops: frozenset[str] = frozenset(), grad: bool = False) -> str:
    """Turn a requested backend into the one that runs ``op`` on ``device``.

    ``peer`` names the peer package behind ``cuda`` for this op; ``triton_ops`` the ops
    that have a Triton implementation. ``grad``: the call must be differentiable — our Triton
    kernels are inference-only, so ``auto`` then skips them. Raises BackendUnavailable for an
    impossible request.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and op not in triton_ops:
        raise BackendUnavailable(f"{op}: backend 'triton' has no kernel for this op yet")
    if backend == "triton" and grad:
        raise BackendUnavailable(f"{op}: the Triton kernels are inference-only (no backward); use auto or ref")
    if backend != "auto":
        _check(backend, op, device, peer)
        return backend
    chosen = "ref"
    if device.type == "cuda":
        if op in triton_ops and triton_available() and not grad:
            chosen = "triton"
        elif peer is not None and peer_module(peer) is not None:
            chosen = "cuda"
    key = f"{op}:{device.type}:{grad}"
    if key not in _logged:
        _logged.add(key)
        log.info("kernel %s on %s: backend %s", op, device.type, chosen)
    return chosen
