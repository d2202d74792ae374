"""The asyncio client: ``AsyncClient``, ``AsyncChatStream`` and ``AsyncSession`` (same API, awaited)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Unpack, overload

import httpx

from vlmamba_client._base import (ChatParams, RetryPolicy, SessionState, StreamAccumulator, build_messages,
                                  chat_body, make_headers, make_timeout, normalize_base_url, resolve_api_key)
from vlmamba_client.errors import APIError, error_from_response, error_from_transport, parse_retry_after
from vlmamba_client.images import ImageInput
from vlmamba_client.metrics import Metrics, parse_metrics
from vlmamba_client.types import ChatChunk, ChatResponse, Health, ModelInfo, Usage

OnDone = Callable[[ChatResponse], None] | None
_closing: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones to tasks


class AsyncChatStream:
    """``async for`` ChatChunks: text deltas, then one final chunk with ``finish_reason`` and ``usage``.

    Closing it early (``await aclose()`` or leaving ``async with``) closes the HTTP connection, and
    the server cancels the generation and frees its slot. A stream dropped after a ``break`` is
    closed in the background on the running loop."""

    def __init__(self, response: httpx.Response, on_done: OnDone = None):
        self._response, self._on_done = response, on_done
        self._lines = response.aiter_lines()
        self._acc, self._pending = StreamAccumulator(), deque[ChatChunk]()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[ChatChunk]:
        return self

    async def __anext__(self) -> ChatChunk:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            await self._read_line()
        return self._pending.popleft()

    async def _read_line(self) -> None:
        try:
            line = await anext(self._lines)
        except StopAsyncIteration:
            await self.aclose()
            self._acc.check_complete()
            return
        except httpx.HTTPError as e:
            await self.aclose()
            raise error_from_transport(e) from e
        try:
            self._pending.extend(self._acc.feed(line))
        except (APIError, ValueError):
            await self.aclose()
            raise
        if self._acc.done:
            await self.aclose()
            if self._on_done is not None:
                self._on_done(self._acc.response())

    @property
    def text(self) -> str:
        return self._acc.text

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish_reason if self._acc.done else None

    @property
    def usage(self) -> Usage | None:
        return self._acc.usage

    async def final(self) -> ChatResponse:
        """Read whatever is left and return the whole answer as a ChatResponse."""
        async for _ in self:
            pass
        self._acc.check_complete()
        return self._acc.response()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Cannot await here: hand the hang-up to the running loop (if any) so the slot is freed.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            task = asyncio.get_running_loop().create_task(self._response.aclose())
        except RuntimeError:
            return  # no running loop: the connection goes when its client is closed
        _closing.add(task)
        task.add_done_callback(_closing.discard)


class AsyncClient:
    """The asyncio twin of :class:`vlmamba_client.Client` (same arguments, awaited methods)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 2, backoff: float = 0.5,
                 max_backoff: float = 8.0, headers: dict[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None):
        self.base_url, self.api_key = normalize_base_url(base_url), resolve_api_key(api_key)
        self.retry = RetryPolicy(max_retries, backoff, max_backoff)
        self.timeout = make_timeout(timeout)
        self._headers = make_headers(self.api_key, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)

    async def _send(self, method: str, path: str, *, json: dict | None = None, stream: bool = False,
                    timeout: float | httpx.Timeout | None = None) -> httpx.Response:
        """One call with retries; returns a 2xx response (unread when ``stream``) or raises."""
        request = self._http.build_request(method, self.base_url + path, json=json, headers=self._headers,
                                           timeout=self.timeout if timeout is None else make_timeout(timeout))
        for attempt in range(self.retry.max_retries + 1):
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                if not self.retry.retry_error(e, method, attempt):
                    raise error_from_transport(e) from e
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            if response.is_success:
                return response
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if not self.retry.retry_status(response.status_code, attempt, retry_after):
                await response.aread()
                await response.aclose()
                raise error_from_response(response)
            await response.aclose()
            await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def health(self) -> Health:
        return Health.model_validate((await self._send("GET", "/health")).json())

    async def models(self) -> list[ModelInfo]:
        body = (await self._send("GET", "/v1/models")).json()
        return [ModelInfo.model_validate(m) for m in body.get("data", [])]

    async def metrics(self) -> Metrics:
        return parse_metrics((await self._send("GET", "/metrics")).text)

    @overload
    async def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
                   images: list[ImageInput] | None = None, system: str | None = None,
                   stream: Literal[False] = False, extra_body: dict | None = None,
                   timeout: float | httpx.Timeout | None = None, **params: Unpack[ChatParams]) -> ChatResponse: ...

    @overload
    async def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
                   images: list[ImageInput] | None = None, system: str | None = None, stream: Literal[True],
                   extra_body: dict | None = None, timeout: float | httpx.Timeout | None = None,
                   **params: Unpack[ChatParams]) -> AsyncChatStream: ...

    async def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
                   images: list[ImageInput] | None = None, system: str | None = None, stream: bool = False,
                   extra_body: dict | None = None, timeout: float | httpx.Timeout | None = None,
                   **params: Unpack[ChatParams]) -> ChatResponse | AsyncChatStream:
        """See :meth:`vlmamba_client.Client.chat`; with ``stream=True`` await it for the stream."""
        return await self._chat(build_messages(messages, prompt, images, system), dict(params), stream,
                                extra_body, timeout)

    async def _chat(self, messages: list[dict], params: dict[str, Any], stream: bool, extra_body: dict | None,
                    timeout: float | httpx.Timeout | None,
                    on_done: OnDone = None) -> ChatResponse | AsyncChatStream:
        body = chat_body(messages, params, stream, extra_body)
        response = await self._send("POST", "/v1/chat/completions", json=body, stream=stream, timeout=timeout)
        if stream:
            return AsyncChatStream(response, on_done)
        result = ChatResponse.from_api(response.json())
        if on_done is not None:
            on_done(result)
        return result

    def session(self, *, system: str | None = None, session_id: str | None = None,
                **defaults: Unpack[ChatParams]) -> AsyncSession:
        return AsyncSession(self, system=system, session_id=session_id, **defaults)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSession:
    """The asyncio twin of :class:`vlmamba_client.Session`."""

    def __init__(self, client: AsyncClient, *, system: str | None = None, session_id: str | None = None,
                 **defaults: Unpack[ChatParams]):
        self.client = client
        self._state = SessionState(system, session_id, dict(defaults))

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def messages(self) -> list[dict]:
        return self._state.messages

    @overload
    async def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: Literal[False] = False,
                  **params: Unpack[ChatParams]) -> ChatResponse: ...

    @overload
    async def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: Literal[True],
                  **params: Unpack[ChatParams]) -> AsyncChatStream: ...

    async def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: bool = False,
                  **params: Unpack[ChatParams]) -> ChatResponse | AsyncChatStream:
        """Send a user turn and record it with the reply (a stream: once it completes)."""
        turn, messages, merged = self._state.request(text, images, dict(params))
        return await self.client._chat(messages, merged, stream, None, None, self._state.recorder(turn))
