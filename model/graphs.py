"""Decode steps, short prefills and image encoding replayed from CUDA graphs.

A decode step of a 64-layer Mamba is a few hundred small kernels; launching them one by one
from Python costs more than running them at small batch. Capturing the step once per bucket
and replaying it removes that cost. The same holds for a prefill of up to a few thousand
tokens (:class:`GraphPrefill`, buckets of batch x length) and for the image tower at a few
images (:class:`GraphEncoder`). Invariants of the decode graphs:

- the graphs read token ids and slot indices from static buffers, so a step copies its
  inputs in and replays; rows past the live batch point at ``scratch_slot``, a pool row no
  sequence owns, so padding a batch up to its bucket never touches a live state;
- every graph writes into the same pool (``state``), in place, so the slots stay the single
  source of truth between graph steps, eager prefill and the session cache;
- the returned logits are a view of the graph's output buffer, valid until the next replay;
- given a vocabulary mask, the decode graphs also mask the logits in place and take their
  argmax, so a greedy batch needs no kernel of its own between replays (:attr:`GraphDecoder.argmax`).
"""

from __future__ import annotations

import logging

import torch

from kernels import masked_argmax
from model.generate import to_host

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_batch: int) -> list[int]:
    """The capture sizes for batches up to ``max_batch`` (the last one is max_batch itself)."""
    top = min(max_batch, BUCKETS[-1])
    return [b for b in BUCKETS if b < top] + [top]


def bucket_for(buckets: list[int], n: int) -> int | None:
    """The smallest of the ascending ``buckets`` that holds ``n``, or None."""
    return next((s for s in buckets if s >= n), None)


def capture_graphs(device, keys, run) -> dict:
    """CUDA graphs of ``run(key)`` for every key, as {key: (graph, output)}: each key runs once on
    a side stream first (compiling kernels and sizing allocator blocks), then is captured in the
    order given (largest first, so the smaller ones reuse its memory) into one memory pool."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for key in keys:
            run(key)
    torch.cuda.current_stream(device).wait_stream(stream)
    graphs = {}
    for key in keys:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run(key)
        graphs[key] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs


class GraphDecoder:
    """``step(ids, slots)`` like ``model.step``, replayed from a captured CUDA graph.

    model: anything with ``step(input_ids (b,), *, state, slots (b,)) -> logits (b, V)``;
    state: the InferenceState pool the engine uses; scratch_slot: a pool row reserved for padding;
    mask: (V,) bool or None, ids never to be sampled: the step sets their logits to -inf and
    keeps the argmax of the masked logits in :attr:`argmax`, (b,) long, valid until the next step.
    Batches larger than the largest bucket run eagerly, the same way.

    Every stream operation between two replays leaves the GPU idle for a few microseconds at one
    row (~8 µs for the two input copies, ~10 for a copy of the tokens to the host; 2.25 ms steps
    of the 2.8B model on an H100), so the step avoids them:

    - two id buffers, and graphs of each bucket for each: a graph reads one and writes its
      argmax into the other, so feeding :attr:`argmax` back (a greedy batch) needs no copy;
    - slots fed under the same host key as the step before are not copied again;
    - :meth:`copy_out` copies the argmax to the host on a side stream, off the step's path. The
      graph that next writes that buffer (two steps on) first waits for the copy.
    """

    def __init__(self, model, state, scratch_slot: int, max_batch: int, mask: torch.Tensor | None = None):
        self.model, self.state, self.scratch, self.mask = model, state, scratch_slot, mask
        self.backend = getattr(model, "backend", "auto")
        self.device = state.ssm.device
        self.buckets = buckets_for(max_batch)
        top = self.buckets[-1]
        self.ids = torch.zeros(2, top, dtype=torch.long, device=self.device)
        self.slots = torch.full((top,), scratch_slot, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.argmax: torch.Tensor | None = None
        self._fed: tuple | None = None  # the key of the slots in self.slots (None: unknown)
        self._copies: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each id buffer
        self._copier = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _run(self, input_ids: torch.Tensor, slots: torch.Tensor,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.step(input_ids, state=self.state, slots=slots)
        return logits, masked_argmax(logits, self.mask, out, backend=self.backend)

    @torch.inference_mode()
    def capture(self) -> "GraphDecoder":
        """Capture every bucket from each id buffer (its argmax into the other), largest first
        so the smaller ones reuse its memory pool."""
        self.slots.fill_(self.scratch)
        self._fed = None
        keys = [(b, side) for b in self.buckets[::-1] for side in (0, 1)]
        self.graphs = {key: (g, out[0]) for key, (g, out) in capture_graphs(
            self.device, keys, lambda k: self._run(self.ids[k[1], :k[0]], self.slots[:k[0]],
                                                   out=self.ids[1 - k[1], :k[0]])).items()}
        log.info("captured decode graphs for batch sizes %s", self.buckets)
        return self

    def bucket(self, b: int) -> int | None:
        return bucket_for(self.buckets, b)

    def step(self, input_ids: torch.Tensor, slots: torch.Tensor, slots_key: tuple | None = None) -> torch.Tensor:
        """input_ids, slots: (b,) on the device -> logits (b, V), masked if a mask was given.
        ``slots_key``: the slots' values on the host (a tuple), if the caller has them: slots
        fed with the same key as the step before are not copied again."""
        b = input_ids.shape[0]
        size = self.bucket(b)
        if size is None:
            logits, self.argmax = self._run(input_ids, slots)
            return logits
        side = self._side_of(input_ids)
        if side is None:  # ids from elsewhere: into the buffer the last step did not write
            side = 1 if self._side_of(self.argmax) == 0 else 0
            shared = input_ids.untyped_storage().data_ptr() == self.ids.untyped_storage().data_ptr()
            self._before_write(side)
            self.ids[side, :b].copy_(input_ids.clone() if shared else input_ids)
        if slots_key is None or slots_key != self._fed:
            self.slots[:b].copy_(slots)
            self.slots[b:size].fill_(self.scratch)
            self._fed = slots_key
        self._before_write(1 - side)
        graph, logits = self.graphs[(size, side)]
        graph.replay()
        self.argmax = self.ids[1 - side, :b]
        return logits[:b]

    def _side_of(self, ids: torch.Tensor | None) -> int | None:
        """Which id buffer ``ids`` is the start of (a (b,) view of it), or None."""
        if ids is None or ids.stride(0) != 1:
            return None
        return next((s for s in (0, 1) if ids.data_ptr() == self.ids[s].data_ptr()), None)

    def _before_write(self, side: int) -> None:
        """Order the copy out of id buffer ``side`` before the stream writes it again."""
        done = self._copies[side]
        if done is not None:
            if not done.query():
                torch.cuda.current_stream(self.device).wait_event(done)
            self._copies[side] = None

    def copy_out(self, dest: torch.Tensor) -> torch.cuda.Event:
        """Copy :attr:`argmax` of the last step into ``dest`` (pinned host memory, (b,) long)
        without holding up the next step; returns the event that marks the copy done."""
        side = self._side_of(self.argmax)
        if side is None:  # an eager step's tokens: copied in stream order
            return to_host(self.argmax, dest)
        self._copier.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copier):
            done = to_host(self.argmax, dest)  # recorded on the side stream
        self._copies[side] = done
        return done


# Prompt lengths prefill graphs are captured at: fine steps for short prompts, 128 tokens apart beyond 256.
PREFILL_LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256) + tuple(range(384, 8193, 128))


def prefill_shapes(max_batch: int, max_tokens: int) -> list[tuple[int, int]]:
    """The (batch, length) buckets of prefill graphs: batch buckets up to ``max_batch`` times
    :data:`PREFILL_LENGTHS`, at most ``max_tokens`` tokens each."""
    return [(b, l) for b in buckets_for(max_batch) for l in PREFILL_LENGTHS if b * l <= max_tokens]


class GraphPrefill:
    """``run(embeds, slots, lengths)`` like ``llm(inputs_embeds=embeds, state=state, slots=slots,
    lengths=lengths, last_only=True)``, replayed from a CUDA graph captured at the smallest
    (batch, length) bucket that holds the batch.

    Launching a 64-layer prefill from Python costs tens of milliseconds of host time whatever
    its size, so prompts of up to a few thousand tokens are bound by the launches, not the GPU;
    the graphs remove that. Invariants:

    - the batch is copied into static buffers: each row right-padded with zero embeddings up to
      the bucket's length, with its true length kept, so the scan carries the state through the
      padding unchanged and the conv state is taken at the row's length; rows past the batch
      have length 1 and point at ``scratch_slot``, a pool row no sequence owns;
    - the returned logits are a view of the graph's output buffer, valid until the next replay;
    - batches that fit no bucket run eagerly, unpadded.

    ``use_graphs=False`` runs the padded path eagerly instead of replaying it: what the graphs
    run, on any device (the tests compare it with the unpadded prefill).
    """

    def __init__(self, llm, state, scratch_slot: int, max_batch: int, max_tokens: int = 2048,
                 use_graphs: bool = True):
        self.llm, self.state, self.scratch, self.use_graphs = llm, state, scratch_slot, use_graphs
        self.shapes = prefill_shapes(max_batch, max_tokens)
        weight = llm.backbone.embedding.weight
        self.device, self.dim, top = weight.device, weight.shape[1], max((b for b, _ in self.shapes), default=0)
        # One flat buffer, so that every (b, l) view of it is contiguous.
        self._embeds = torch.zeros(max((b * l for b, l in self.shapes), default=0) * self.dim,
                                   dtype=weight.dtype, device=self.device)
        self._slots = torch.full((top,), scratch_slot, dtype=torch.long, device=self.device)
        self._lengths = torch.ones(top, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def bucket(self, b: int, l: int) -> tuple[int, int] | None:
        """The smallest bucket holding a (b, l) batch (fewest padded tokens), or None."""
        fits = [s for s in self.shapes if s[0] >= b and s[1] >= l]
        return min(fits, key=lambda s: (s[0] * s[1], s[0])) if fits else None

    def _view(self, shape: tuple[int, int]) -> torch.Tensor:
        return self._embeds[: shape[0] * shape[1] * self.dim].view(*shape, self.dim)

    def _padded(self, shape: tuple[int, int]) -> torch.Tensor:
        return self.llm(inputs_embeds=self._view(shape), state=self.state, slots=self._slots[: shape[0]],
                        lengths=self._lengths[: shape[0]], last_only=True)

    @torch.inference_mode()
    def capture(self) -> "GraphPrefill":
        """Capture every bucket, largest first, into one memory pool. The buffers hold padding
        while capturing, so the warm-up runs and captures only touch the scratch slot."""
        if not self.use_graphs:
            return self
        self._slots.fill_(self.scratch)
        self._lengths.fill_(1)
        self.graphs = capture_graphs(self.device, sorted(self.shapes, key=lambda s: s[0] * s[1], reverse=True),
                                     self._padded)
        log.info("captured %d prefill graphs (batch x length up to %s)", len(self.graphs),
                 max(self.shapes, key=lambda s: s[0] * s[1]) if self.shapes else None)
        return self

    def run(self, embeds: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (b, l, D) in the model dtype, slots (b,), lengths (b,) or None (all l) -> logits (b, V)."""
        b, l, _ = embeds.shape
        shape = self.bucket(b, l)
        if shape is None:
            return self.llm(inputs_embeds=embeds, state=self.state, slots=slots, lengths=lengths, last_only=True)
        rows = shape[0]
        buf = self._view(shape)
        buf[:b, :l].copy_(embeds)
        buf[:b, l:].zero_()
        buf[b:].zero_()
        self._slots[:b].copy_(slots)
        self._slots[b:rows].fill_(self.scratch)
        if lengths is None:
            self._lengths[:b].fill_(l)
        else:
            self._lengths[:b].copy_(lengths)
        self._lengths[b:rows].fill_(1)
        if not self.use_graphs:
            return self._padded(shape)[:b]
        graph, out = self.graphs[shape]
        graph.replay()
        self.replays += 1
        return out[:b]


class GraphEncoder:
    """``run(pixel_values)`` like ``encode(pixel_values)`` (images (i, ...) -> (i, p, D)),
    replayed from CUDA graphs captured at image-count buckets up to ``max_images``: the image
    tower of one image is a few hundred small kernels, launched in a fraction of the time
    Python takes to issue them. Padding images are zeros and their outputs are dropped; more
    images than the largest bucket run eagerly. The output is valid until the next replay."""

    def __init__(self, encode, pixel_shape: tuple[int, ...], dtype: torch.dtype, device, max_images: int = 8):
        self.encode, self.device = encode, torch.device(device)
        self.buckets = buckets_for(max_images)
        self._pixels = torch.zeros(self.buckets[-1], *pixel_shape, dtype=dtype, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @torch.inference_mode()
    def capture(self) -> "GraphEncoder":
        self.graphs = capture_graphs(self.device, self.buckets[::-1], lambda i: self.encode(self._pixels[:i]))
        log.info("captured image-encoder graphs for %s images", self.buckets)
        return self

    def run(self, pixel_values: torch.Tensor) -> torch.Tensor:
        i = pixel_values.shape[0]
        size = bucket_for(self.buckets, i)
        if size is None or pixel_values.shape[1:] != self._pixels.shape[1:]:
            return self.encode(pixel_values)
        self._pixels[:i].copy_(pixel_values)
        self._pixels[i:size].zero_()
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        return out[:i]
