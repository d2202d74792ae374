"""Per-request sampling parameters and a batched sampler (rows may differ in every setting).

Glossary: b rows (sequences), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.errors import InvalidRequest


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (-1 <= self.top_k < 2**31, "top_k", "must be >= 0 (or -1 for off)"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed", "must fit in 64 bits"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InvalidRequest(f"{name} {msg}", param=name)
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI penalties. logits, counts (b, V) (generated-token counts); presence, frequency (b,)."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Pick one token per row. logits (b, V) float; temperature, top_p (b,) float; top_k (b,) long.

    Rows with temperature 0 take the argmax. Others sample from the temperature-scaled,
    top-k / top-p filtered distribution with the exponential race (argmax of p / E, E ~ Exp(1)),
    which lets a seeded row draw its noise from its own generator.
    """
    logits = logits.float()
    greedy = temperature == 0
    if temperature.device.type == "cpu" and bool(greedy.all()):  # on a GPU this test would wait for the device
        return logits.argmax(-1)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = torch.softmax(_filter(scaled, top_k, top_p), dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators or []):
        if g is not None:
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask with -inf what top-k and top-p drop. logits (b, V)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    ranks = torch.arange(V, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p (the first token always stays).
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
