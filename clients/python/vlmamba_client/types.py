"""Typed response objects (pydantic). Each keeps the server's JSON in ``raw``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    # Newer servers may add fields: keep them instead of failing.
    model_config = ConfigDict(extra="allow")


class Usage(_Model):
    """Token counts; ``cached_tokens`` of the prompt were resumed from the server's state cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_api(cls, usage: dict | None) -> Usage | None:
        """OpenAI's ``usage`` (with ``prompt_tokens_details.cached_tokens``) -> Usage."""
        if not usage:
            return None
        details = usage.get("prompt_tokens_details") or {}
        return cls(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                   total_tokens=usage.get("total_tokens", 0), cached_tokens=details.get("cached_tokens") or 0)


class ChatResponse(_Model):
    """A finished chat completion: the assistant's ``text``, why it stopped, and the token usage."""

    id: str
    model: str
    text: str
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    created: int | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False, exclude=True)

    @property
    def message(self) -> dict[str, str]:
        """The reply as a chat message, ready to append to a conversation."""
        return {"role": "assistant", "content": self.text}

    @classmethod
    def from_api(cls, body: dict) -> ChatResponse:
        choice = (body.get("choices") or [{}])[0]
        return cls(id=body.get("id", ""), model=body.get("model", ""), created=body.get("created"),
                   text=(choice.get("message") or {}).get("content") or "", finish_reason=choice.get("finish_reason"),
                   usage=Usage.from_api(body.get("usage")) or Usage(), raw=body)


class ChatChunk(_Model):
    """One streamed item: a text delta; the last item has ``finish_reason`` and ``usage`` (and no text)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    raw: dict[str, Any] | None = Field(default=None, repr=False, exclude=True)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


class Health(_Model):
    """``GET /health``: ``status`` is "ok" once the model is loaded and the engine is alive."""

    status: str
    running: int = 0
    waiting: int = 0
    slots_used: int = 0


class ModelInfo(_Model):
    """One entry of ``GET /v1/models``."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
