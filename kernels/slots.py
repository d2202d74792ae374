"""Decode-step slot routing for a pipeline that runs ahead of the host.

When the engine keeps two decode steps in flight, a step can be launched for a sequence whose
previous step fed it an end token the host has not read yet. That step must leave the slot's
state alone: the state after the end token is what the session cache keeps for a follow-up
turn. Each slot has a row of the token ids that end its sequence and a flag set once a step has
fed it one; a step routes rows whose flag was already set to the pool's scratch slot.

Shapes: ids, slots (b,) long (the ids fed this step, the rows' slots; rows at ``scratch`` are
padding); ended (p,) bool; end_ids (p, k) long, -1 where unused. Returns (b,) long.
"""

from __future__ import annotations

import torch

from kernels._backend import resolve_backend
from kernels.selective_scan import _triton_ops


def route_slots_ref(ids: torch.Tensor, slots: torch.Tensor, ended: torch.Tensor, end_ids: torch.Tensor,
                    scratch: int) -> torch.Tensor:
    """The slots to run this step on: ``scratch`` for rows whose slot had been fed an end token
    by an earlier step, their own slot otherwise. Sets ``ended`` in place for the slots fed one of
    their end ids now (the step that feeds it still writes the slot). Padding rows change nothing."""
    was = ended[slots]
    ends = end_ids[slots]
    hit = ((ends == ids[:, None]) & (ends >= 0)).any(-1)
    # Padding rows write their scratch flag back unchanged (no data-dependent shapes: capturable).
    ended[slots] = torch.where(slots != scratch, was | hit, was)
    return torch.where(was, torch.full_like(slots, scratch), slots)


def route_slots(ids: torch.Tensor, slots: torch.Tensor, ended: torch.Tensor, end_ids: torch.Tensor, scratch: int,
                backend: str = "auto") -> torch.Tensor:
    """Same contract as :func:`route_slots_ref`; one short kernel on the GPU instead of the
    reference's eight, so that the decode graphs that route pay one launch; ``cuda`` runs the
    reference (no peer kernel)."""
    if backend != "cuda":
        chosen = resolve_backend(backend, "route_slots", ids.device, None, _triton_ops())
        if chosen == "triton":
            from kernels.triton import route_slots_triton

            return route_slots_triton(ids, slots, ended, end_ids, scratch)
    return route_slots_ref(ids, slots, ended, end_ids, scratch)
