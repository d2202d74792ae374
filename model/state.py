"""The explicit inference state: one pool of recurrent-state slots shared by all layers.

A running sequence owns one slot index. Prefill continues from whatever its slot holds
(zeros after :meth:`InferenceState.reset`, or a cached state copied in), and every kernel
reads and writes the slot rows in place. Modules keep no hidden caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InferenceState:
    """conv: (n_layer, p, d, w - 1) last conv inputs in the model dtype;
    ssm: (n_layer, p, d, n) selective-scan states, float32 by default. bfloat16 storage halves
    the state's memory and the decode step's state traffic (the kernels still compute in fp32
    and round once per step), at the cost of that rounding accumulating over long sequences."""

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def allocate(cls, num_slots: int, n_layer: int, d_inner: int, d_conv: int, d_state: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 ssm_dtype: torch.dtype = torch.float32) -> "InferenceState":
        return cls(conv=torch.zeros(n_layer, num_slots, d_inner, d_conv - 1, dtype=dtype, device=device),
                   ssm=torch.zeros(n_layer, num_slots, d_inner, d_state, dtype=ssm_dtype, device=device))

    @property
    def num_slots(self) -> int:
        return self.conv.shape[1]

    @property
    def bytes_per_slot(self) -> int:
        per = lambda t: t[:, 0].numel() * t.element_size()
        return per(self.conv) + per(self.ssm)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (p, d, w - 1) and (p, d, n) of layer ``i``; writes go to the pool."""
        return self.conv[i], self.ssm[i]

    def reset(self, slots: torch.Tensor | list[int]) -> None:
        """Zero the given slots so the next prefill starts a fresh sequence. Slots given as ints
        are zeroed one by one, so no index list is copied to the device (on a GPU that copy
        would wait for every queued kernel, such as a decode step in flight)."""
        if isinstance(slots, torch.Tensor):
            self.conv[:, slots] = 0
            self.ssm[:, slots] = 0
            return
        for slot in slots:
            self.conv[:, int(slot)].zero_()
            self.ssm[:, int(slot)].zero_()

    def read(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A detached copy of one slot: ((n_layer, d, w - 1), (n_layer, d, n))."""
        return self.conv[:, slot].clone(), self.ssm[:, slot].clone()

    def write(self, slot: int, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Load a copy made by :meth:`read` into ``slot``."""
        self.conv[:, slot].copy_(saved[0])
        self.ssm[:, slot].copy_(saved[1])


class SlotEnds:
    """Per pool slot: the token ids that end its sequence, and whether a decode step has fed one.

    A decode step that routes (:meth:`route`, :func:`kernels.route_slots`) runs rows whose slot was
    fed an end token by an earlier step on the ``scratch`` slot instead, so their state stays the
    one after the end token. That lets the engine launch a step before it has read the tokens of
    the one before. ``width``: end ids per slot (the end-of-sequence ids and any stop ids)."""

    def __init__(self, num_slots: int, scratch: int, device: torch.device | str = "cpu", width: int = 8):
        self.scratch = scratch
        self.ended = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.ids = torch.full((num_slots, width), -1, dtype=torch.long, device=device)

    def fits(self, ends) -> bool:
        return len(ends) <= self.ids.shape[1]

    def arm(self, slot: int, ends) -> None:
        """Give ``slot`` a new sequence's end ids (at most ``width``) and clear its flag, in stream
        order: after every step already launched on the slot's previous sequence."""
        from model.generate import to_device

        if not self.fits(ends):
            raise ValueError(f"{len(ends)} end ids for one slot; the table holds {self.ids.shape[1]}")
        row = sorted(ends) + [-1] * (self.ids.shape[1] - len(ends))
        self.ids[slot].copy_(to_device(row, self.ids.device, torch.long))
        self.ended[slot].fill_(False)

    def route(self, ids: torch.Tensor, slots: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        from kernels import route_slots

        return route_slots(ids, slots, self.ended, self.ids, self.scratch, backend=backend)
