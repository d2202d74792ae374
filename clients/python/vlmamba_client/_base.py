"""What the sync and async clients share: settings, retry policy, request bodies, SSE parsing, sessions."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx

from vlmamba_client.errors import APIConnectionError, error_from_body
from vlmamba_client.images import ImageInput, image_part, user_message
from vlmamba_client.types import ChatChunk, ChatResponse, Usage

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # generation can be long and a non-streamed reply sends nothing until done
USER_AGENT = "vlmamba-client/0.1.0"


class ChatParams(TypedDict, total=False):
    """Sampling and request parameters of ``chat()``; unset ones take the server's defaults."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: str | list[str]
    presence_penalty: float
    frequency_penalty: float
    session_id: str
    ignore_eos: bool
    user: str


PARAM_NAMES = frozenset(ChatParams.__annotations__)


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter. Retried: 429 and 503 responses (any method, the server did
    not start the work) and connection errors where the request cannot have reached the server
    (connect errors; for GET any transport error, since GET is idempotent). A POST whose response
    broke mid-way is never retried: the server may already have generated the answer."""

    max_retries: int = 2
    backoff: float = 0.5       # first delay, doubled each attempt
    max_backoff: float = 8.0   # cap of the computed delay
    max_retry_after: float = 60.0  # a longer Retry-After is not waited for: the error is raised

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")

    def retry_status(self, status: int, attempt: int, retry_after: float | None) -> bool:
        if attempt >= self.max_retries or status not in (429, 503):
            return False
        return retry_after is None or retry_after <= self.max_retry_after

    def retry_error(self, exc: httpx.HTTPError, method: str, attempt: int) -> bool:
        if attempt >= self.max_retries:
            return False
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            return True  # nothing was sent
        return method == "GET" and isinstance(exc, httpx.TransportError)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1``: the server's Retry-After plus up to 10 %
        jitter, else half to all of the exponential step (jitter spreads a crowd of clients)."""
        if retry_after is not None:
            return retry_after * random.uniform(1.0, 1.1)
        step = min(self.max_backoff, self.backoff * 2**attempt)
        return step * random.uniform(0.5, 1.0)


def normalize_base_url(url: str | None) -> str:
    """``http://host:8000``, ``http://host:8000/`` and OpenAI-style ``.../v1`` all mean the server root."""
    url = (url or os.environ.get("VLMAMBA_URL") or DEFAULT_URL).rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    total = DEFAULT_TIMEOUT if timeout is None else timeout
    return httpx.Timeout(total, connect=min(total, 10.0))


def make_headers(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {**headers, **(extra or {})}


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("VLMAMBA_API_KEY") or None


def build_messages(messages: list[dict] | None, prompt: str | None, images: list[ImageInput] | None,
                   system: str | None) -> list[dict]:
    """``messages`` or ``prompt`` -> the request's messages. Images go into the prompt's user turn,
    or are put before the text of the last user message of ``messages``."""
    if (messages is None) == (prompt is None):
        raise TypeError("pass exactly one of messages= or prompt=")
    if prompt is not None:
        out = [user_message(prompt, images)]
    else:
        out = [dict(m) for m in messages]  # shallow copies: the caller's list is not modified
        if images:
            _attach_images(out, images)
    return ([{"role": "system", "content": system}] if system else []) + out


def _attach_images(messages: list[dict], images: list[ImageInput]) -> None:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if last is None:
        raise ValueError("images= needs a user message to attach them to")
    content = last.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    last["content"] = [*(image_part(im) for im in images), *parts]


def chat_body(messages: list[dict], params: dict[str, Any], stream: bool,
              extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /v1/chat/completions``; unset parameters are left out."""
    unknown = set(params) - PARAM_NAMES
    if unknown:
        raise TypeError(f"unknown chat parameter(s): {', '.join(sorted(unknown))} "
                        "(pass server extensions through extra_body=)")
    body: dict[str, Any] = {"messages": messages, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return {**body, **(extra_body or {})}


class StreamAccumulator:
    """Turns the SSE lines of a streamed completion into ChatChunks and keeps the running totals.

    Text deltas are handed out as they come; the finish reason and usage (which arrive in two
    separate events) are handed out together as one final chunk at ``[DONE]``."""

    def __init__(self) -> None:
        self.id, self.model, self.created = "", "", None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False
        self._data: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, line: str) -> list[ChatChunk]:
        """One line of the response body -> the chunks it completes (raises ServerError on an
        ``error`` event)."""
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return []
        if line or not self._data:
            return []  # comments, other SSE fields, blank keep-alives
        data, self._data = "\n".join(self._data), []
        return self._event(data)

    def _event(self, data: str) -> list[ChatChunk]:
        if data.strip() == "[DONE]":
            self.done = True
            return [ChatChunk(finish_reason=self.finish_reason or "stop", usage=self.usage)]
        body = json.loads(data)
        if "error" in body:
            raise error_from_body(500, body)
        self.id, self.model = body.get("id", self.id), body.get("model", self.model)
        self.created = body.get("created", self.created)
        self.usage = Usage.from_api(body.get("usage")) or self.usage
        out = []
        for choice in body.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            text = (choice.get("delta") or {}).get("content")
            if text:
                self.parts.append(text)
                out.append(ChatChunk(text=text, raw=body))
        return out

    def check_complete(self) -> None:
        if not self.done:
            raise APIConnectionError("the stream ended before the server finished it ([DONE] not received)")

    def response(self) -> ChatResponse:
        """The whole answer in the shape of a non-streamed response (``raw`` synthesized)."""
        usage = self.usage or Usage()
        raw = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                            "finish_reason": self.finish_reason}],
               "usage": {**usage.model_dump(exclude={"cached_tokens"}),
                         "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}}
        return ChatResponse(id=self.id, model=self.model, created=self.created, text=self.text,
                            finish_reason=self.finish_reason, usage=usage, raw=raw)


class SessionState:
    """A conversation and its ``session_id``, shared by Session and AsyncSession. A turn is
    recorded only once its reply completed, so a failed or abandoned turn can simply be re-asked."""

    def __init__(self, system: str | None, session_id: str | None, defaults: dict[str, Any]):
        self.session_id = session_id or "sess-" + uuid.uuid4().hex
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.defaults = defaults

    def request(self, text: str, images: list[ImageInput] | None,
                params: dict[str, Any]) -> tuple[dict, list[dict], dict[str, Any]]:
        """(the new user turn, the messages to send, the parameters to send)."""
        turn = user_message(text, images)  # images become URLs once, then are resent as-is
        return turn, [*self.messages, turn], {**self.defaults, **params, "session_id": self.session_id}

    def recorder(self, turn: dict) -> Callable[[ChatResponse], None]:
        def record(response: ChatResponse) -> None:
            self.messages += [turn, response.message]
        return record
