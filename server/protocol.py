"""OpenAI chat-completions schemas (pydantic). Unknown fields are accepted and ignored."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    session_id: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False
    user: str | None = None


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage_dict(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_body(cid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": usage}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish: str | None = None,
               usage: dict | None = None, with_choice: bool = True) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(body: dict) -> str:
    """One server-sent event carrying ``body`` as compact JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def content_chunk_sse(cid: str, model: str, created: int) -> Callable[[str], str]:
    """``text -> sse(chunk_body(..., {"content": text}))`` for one stream, byte for byte, with the
    constant part of the body serialised once: a stream sends one such chunk per token."""
    marker = "\x00"
    whole = sse(chunk_body(cid, model, created, {"content": marker}))
    head, _, tail = whole.rpartition(json.dumps(marker))  # the content follows the id and the model name
    return lambda text: head + json.dumps(text) + tail
