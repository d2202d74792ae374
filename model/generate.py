"""Library-level generation: prefill once, then one recurrent ``step`` per token.

The engine batches many sequences; this module is the single-sequence path used by the
CLI, tests and scripts, and its :class:`SequenceDecoder` (sampling bookkeeping, detokenizing,
stop handling) is shared with the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from model.detokenize import IncrementalDetokenizer, StopMatcher
from model.sampling import SamplingParams, apply_penalties, sample


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class SequenceDecoder:
    """Everything one sequence needs between steps: counts, detokenizer, stop matcher, RNG."""

    tokenizer: object
    params: SamplingParams
    eos_ids: tuple[int, ...] = ()
    device: str | torch.device = "cpu"
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        self.detok = IncrementalDetokenizer(self.tokenizer)
        self.stop = StopMatcher(self.params.stop)
        self.generator = self.params.make_generator(self.device)
        self.ends = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token_id: int) -> str:
        """Record a sampled token; returns the text it releases (may be empty)."""
        self.token_ids.append(token_id)
        if token_id in self.ends:
            self.finish_reason = "stop"
            return self.stop.flush()
        out = self.stop.feed(self.detok.push(token_id))
        if self.stop.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            out += self.stop.flush()
        return out


def logits_mask(vocab_size: int, n_real: int, banned: tuple[int, ...], device) -> torch.Tensor:
    """(V,) bool: True for ids that must never be sampled (vocab padding, the image placeholder)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[n_real:] = True
    mask[list(banned)] = True
    return mask


def to_device(data, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype, device=device)`` without stalling the host on a GPU.

    A host-to-device copy from pageable memory is a blocking copy: PyTorch waits for the whole
    stream, so the engine would sit idle until the decode step in flight had finished instead
    of queueing the next one. On CUDA the values go through pinned memory with an asynchronous
    copy instead (the caching host allocator keeps the pinned buffer until the copy has run)."""
    t = torch.as_tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(src: torch.Tensor, dest: torch.Tensor) -> torch.cuda.Event:
    """Copy ``src`` (on a GPU) into ``dest`` (pinned host memory) in stream order, without the
    host waiting; returns the event that marks the copy done."""
    dest.copy_(src, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return done


def pick_tokens(logits: torch.Tensor, decoders: list[SequenceDecoder], mask: torch.Tensor | None = None,
                argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row of logits (b, V) with each row's own parameters. ``argmax``: the
    rows' argmax of the masked logits where already taken (a decode graph's), used when every
    row is greedy."""
    ps = [d.params for d in decoders]
    penalised = any(p.presence_penalty or p.frequency_penalty for p in ps)
    greedy = not penalised and all(p.temperature == 0 for p in ps)  # decided on the host: no device sync
    if greedy and argmax is not None:
        return argmax
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    if greedy:
        return logits.argmax(-1)
    dev = logits.device
    logits = logits.float()
    if penalised:
        pres = to_device([p.presence_penalty for p in ps], dev, torch.float32)
        freq = to_device([p.frequency_penalty for p in ps], dev, torch.float32)
        counts = torch.zeros_like(logits)
        for i, d in enumerate(decoders):
            if d.token_ids:
                counts[i].index_add_(0, to_device(d.token_ids, dev, torch.long), torch.ones(len(d.token_ids), device=dev))
        logits = apply_penalties(logits, counts, pres, freq)
    return sample(logits, to_device([p.temperature for p in ps], dev, torch.float32),
                  to_device([p.top_k for p in ps], dev, torch.long), to_device([p.top_p for p in ps], dev, torch.float32),
                  [d.generator for d in decoders])


@torch.no_grad()
def stream_generate(model, processor, messages: list[dict] | None = None, prompt: str | None = None,
                    images: list | None = None, params: SamplingParams | None = None) -> Iterator[str]:
    """Yield text deltas for one conversation (``messages``) or raw ``prompt``; returns a Generation."""
    params = params or SamplingParams()
    enc = processor.encode_messages(messages, images) if messages is not None else processor.encode(prompt, images)
    device = model.llm.backbone.embedding.weight.device
    state, slot = model.allocate_state(1), torch.tensor([0], device=device)
    ids = torch.tensor([enc.input_ids], device=device)
    pixels = None if enc.pixel_values is None else enc.pixel_values.to(device)
    logits = model(ids, pixels, state=state, slots=slot, last_only=True)
    dec = SequenceDecoder(processor.tokenizer, params, tuple(processor.eos_token_ids), device)
    mask = logits_mask(logits.shape[-1], len(processor.tokenizer), (processor.image_token_id,), device)
    text = []
    while True:
        token = int(pick_tokens(logits, [dec], mask)[0])
        delta = dec.accept(token)
        if delta:
            text.append(delta)
            yield delta
        if dec.finished:
            return Generation("".join(text), dec.token_ids, dec.finish_reason, len(enc.input_ids))
        logits = model.step(torch.tensor([token], device=device), state=state, slots=slot)


def generate(model, processor, messages=None, prompt=None, images=None, params=None) -> Generation:
    """Run :func:`stream_generate` to the end and return the whole :class:`Generation`."""
    it = stream_generate(model, processor, messages, prompt, images, params)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


@torch.no_grad()
def greedy_tokens(lm, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of a token list with a bare :class:`~model.mamba.MambaLM` (no stopping)."""
    device = lm.backbone.embedding.weight.device
    state, slot = lm.allocate_state(1), torch.tensor([0], device=device)
    logits = lm(torch.tensor([prompt_ids], device=device), state=state, slots=slot, last_only=True)
    out = []
    for _ in range(max_new_tokens):
        out.append(int(logits.argmax(-1)[0]))
        logits = lm.step(torch.tensor(out[-1:], device=device), state=state, slots=slot)
    return out
