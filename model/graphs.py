"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a 64-layer Mamba is a few hundred small kernels; launching them one by one
from Python costs more than running them at small batch. Capturing the step once per bucket
and replaying it removes that cost. Invariants:

- the graphs read token ids and slot indices from static buffers, so a step copies its
  inputs in and replays; rows past the live batch point at ``scratch_slot``, a pool row no
  sequence owns, so padding a batch up to its bucket never touches a live state;
- every graph writes into the same pool (``state``), in place, so the slots stay the single
  source of truth between graph steps, eager prefill and the session cache;
- the returned logits are a view of the graph's output buffer, valid until the next replay.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_batch: int) -> list[int]:
    """The capture sizes for batches up to ``max_batch`` (the last one is max_batch itself)."""
    top = min(max_batch, BUCKETS[-1])
    return [b for b in BUCKETS if b < top] + [top]


class GraphDecoder:
    """``step(ids, slots)`` like ``model.step``, replayed from a captured CUDA graph.

    model: anything with ``step(input_ids (b,), *, state, slots (b,)) -> logits (b, V)``;
    state: the InferenceState pool the engine uses; scratch_slot: a pool row reserved for padding.
    Batches larger than the largest bucket run eagerly.
    """

    def __init__(self, model, state, scratch_slot: int, max_batch: int):
        self.model, self.state, self.scratch = model, state, scratch_slot
        self.device = state.ssm.device
        self.buckets = buckets_for(max_batch)
        top = self.buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=self.device)
        self.slots = torch.full((top,), scratch_slot, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self) -> "GraphDecoder":
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        self.slots.fill_(self.scratch)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up compiles kernels and sizes allocator blocks
            for b in self.buckets:
                self.model.step(self.ids[:b], state=self.state, slots=self.slots[:b])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.step(self.ids[:b], state=self.state, slots=self.slots[:b])
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch sizes %s", self.buckets)
        return self

    def bucket(self, b: int) -> int | None:
        return next((s for s in self.buckets if s >= b), None)

    def step(self, input_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """input_ids, slots: (b,) on the device -> logits (b, V)."""
        b = input_ids.shape[0]
        size = self.bucket(b)
        if size is None:
            return self.model.step(input_ids, state=self.state, slots=slots)
        self.ids[:b].copy_(input_ids)
        self.slots[:b].copy_(slots)
        self.slots[b:size].fill_(self.scratch)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
