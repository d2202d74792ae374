"""Plain dataclasses between the server and the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.sampling import SamplingParams


@dataclass
class ImageInput:
    """One preprocessed image: pixel_values (3, H, W), float32 and normalized, or uint8 from
    ``processor.preprocess_images(..., normalize=False)``, which the engine normalizes on its
    device; and a digest of its pixels (cache identity)."""

    pixel_values: torch.Tensor
    digest: str


@dataclass
class EngineOutput:
    """One event of a request: new text, and on the last event the finish reason and usage."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_key: bytes | None = None  # cache key of the whole prompt, computed once at admission
    error: str | None = None


@dataclass
class EngineStats:
    """What the metrics and /health read of the engine: requests, slots and the session state cache."""

    running: int = 0
    waiting: int = 0
    slots_used: int = 0
    slots_total: int = 0
    cache_bytes: int = 0
    cache_entries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0


@dataclass(eq=False)
class EngineRequest:
    """A generation request. ``sink`` receives every EngineOutput (called from the engine thread, or
    from the reader thread of :class:`~server.engine.process.EngineProcess`).

    ``scope`` isolates cached states (one per API key); ``session_id`` pins a conversation.
    """

    request_id: str
    prompt_ids: list[int]
    images: list[ImageInput]
    params: SamplingParams
    sink: Callable[[EngineOutput], None]
    scope: str = ""
    session_id: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    # Owned by the engine:
    slot: int | None = None
    admit_time: float | None = None
    cached_tokens: int = 0
    decoder: object = None
    last_token: int | None = None  # the latest token the host has seen (its step may be in flight)
    fed: int = 0  # generated tokens already fed into the slot's state by launched decode steps
    prompt_key: bytes | None = None  # cache key of the whole prompt (admission)
    chain: bytes | None = None  # cache key of the prompt and the first ``hashed`` generated tokens
    hashed: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    aborted: bool = False
    answered: bool = False  # its final output has been sent

    def __repr__(self) -> str:  # lengths only: never prompts, images or token ids
        return (f"EngineRequest(id={self.request_id}, prompt_len={len(self.prompt_ids)}, "
                f"images={len(self.images)}, slot={self.slot})")
