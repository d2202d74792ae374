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
