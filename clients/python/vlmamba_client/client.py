"""The synchronous client: ``Client``, its streams (``ChatStream``) and conversations (``Session``)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal, Unpack, overload

import httpx

from vlmamba_client._base import (ChatParams, RetryPolicy, SessionState, StreamAccumulator, build_messages,
                                  chat_body, make_headers, make_timeout, normalize_base_url, resolve_api_key)
from vlmamba_client.errors import (APIError, error_from_response, error_from_transport, parse_retry_after)
from vlmamba_client.images import ImageInput
from vlmamba_client.metrics import Metrics, parse_metrics
from vlmamba_client.types import ChatChunk, ChatResponse, Health, ModelInfo, Usage

OnDone = Callable[[ChatResponse], None] | None


class ChatStream:
    """Iterate for ChatChunks: text deltas, then one final chunk with ``finish_reason`` and ``usage``.

    Closing it early (``close()``, leaving a ``with`` block, or dropping it after a ``break``)
    closes the HTTP connection, and the server cancels the generation and frees its slot."""

    def __init__(self, response: httpx.Response, on_done: OnDone = None):
        self._response, self._on_done = response, on_done
        self._lines = response.iter_lines()
        self._acc, self._pending = StreamAccumulator(), deque[ChatChunk]()
        self._closed = False

    def __iter__(self) -> Iterator[ChatChunk]:
        return self

    def __next__(self) -> ChatChunk:
        while not self._pending:
            if self._closed:
                raise StopIteration
            self._read_line()
        return self._pending.popleft()

    def _read_line(self) -> None:
        try:
            line = next(self._lines)
        except StopIteration:
            self.close()
            self._acc.check_complete()
            return
        except httpx.HTTPError as e:
            self.close()
            raise error_from_transport(e) from e
        try:
            self._pending.extend(self._acc.feed(line))
        except (APIError, ValueError):
            self.close()
            raise
        if self._acc.done:
            self.close()
            if self._on_done is not None:
                self._on_done(self._acc.response())

    # ---- results --------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The text received so far (all of it once the stream is exhausted)."""
        return self._acc.text

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish_reason if self._acc.done else None

    @property
    def usage(self) -> Usage | None:
        return self._acc.usage

    def final(self) -> ChatResponse:
        """Read whatever is left and return the whole answer as a ChatResponse."""
        for _ in self:
            pass
        self._acc.check_complete()  # closed early: there is no whole answer
        return self._acc.response()

    # ---- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # ``for c in client.chat(..., stream=True): break`` drops the stream: hang up then.
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A client of one vlmamba-serve server.

    ``base_url`` defaults to ``$VLMAMBA_URL`` or http://127.0.0.1:8000 and ``api_key`` to
    ``$VLMAMBA_API_KEY``. ``timeout`` is seconds per network operation (a non-streamed reply must
    arrive within it). 429/503 responses and connection failures are retried ``max_retries`` times
    with exponential backoff (``backoff`` doubling up to ``max_backoff``) and jitter, honouring
    ``Retry-After``. ``http_client`` lets you bring your own httpx.Client (proxies, transports)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 2, backoff: float = 0.5,
                 max_backoff: float = 8.0, headers: dict[str, str] | None = None,
                 http_client: httpx.Client | None = None):
        self.base_url, self.api_key = normalize_base_url(base_url), resolve_api_key(api_key)
        self.retry = RetryPolicy(max_retries, backoff, max_backoff)
        self.timeout = make_timeout(timeout)
        self._headers = make_headers(self.api_key, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)

    # ---- transport ----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, json: dict | None = None, stream: bool = False,
              timeout: float | httpx.Timeout | None = None) -> httpx.Response:
        """One call with retries; returns a 2xx response (unread when ``stream``) or raises."""
        request = self._http.build_request(method, self.base_url + path, json=json, headers=self._headers,
                                           timeout=self.timeout if timeout is None else make_timeout(timeout))
        for attempt in range(self.retry.max_retries + 1):
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                if not self.retry.retry_error(e, method, attempt):
                    raise error_from_transport(e) from e
                time.sleep(self.retry.delay(attempt))
                continue
            if response.is_success:
                return response
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if not self.retry.retry_status(response.status_code, attempt, retry_after):
                response.read()
                response.close()
                raise error_from_response(response)
            response.close()
            time.sleep(self.retry.delay(attempt, retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _get(self, path: str) -> httpx.Response:
        return self._send("GET", path)

    # ---- endpoints ----------------------------------------------------------------------------------
    def health(self) -> Health:
        """``GET /health``; raises ServerError (503) while the model is not loaded."""
        return Health.model_validate(self._get("/health").json())

    def models(self) -> list[ModelInfo]:
        """The served model(s) (``GET /v1/models``)."""
        return [ModelInfo.model_validate(m) for m in self._get("/v1/models").json().get("data", [])]

    def metrics(self) -> Metrics:
        """``GET /metrics`` parsed: ``m.value("vlmamba_requests_finished_total", reason="stop")``."""
        return parse_metrics(self._get("/metrics").text)

    @overload
    def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
             images: list[ImageInput] | None = None, system: str | None = None, stream: Literal[False] = False,
             extra_body: dict | None = None, timeout: float | httpx.Timeout | None = None,
             **params: Unpack[ChatParams]) -> ChatResponse: ...

    @overload
    def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
             images: list[ImageInput] | None = None, system: str | None = None, stream: Literal[True],
             extra_body: dict | None = None, timeout: float | httpx.Timeout | None = None,
             **params: Unpack[ChatParams]) -> ChatStream: ...

    def chat(self, messages: list[dict] | None = None, *, prompt: str | None = None,
             images: list[ImageInput] | None = None, system: str | None = None, stream: bool = False,
             extra_body: dict | None = None, timeout: float | httpx.Timeout | None = None,
             **params: Unpack[ChatParams]) -> ChatResponse | ChatStream:
        """A chat completion. Pass ``prompt`` (one user turn, with ``images``) or OpenAI-style
        ``messages`` (``images`` then join the last user message). ``stream=True`` returns a
        ChatStream. ``extra_body`` adds raw fields to the request."""
        return self._chat(build_messages(messages, prompt, images, system), dict(params), stream, extra_body,
                          timeout)

    def _chat(self, messages: list[dict], params: dict[str, Any], stream: bool, extra_body: dict | None,
              timeout: float | httpx.Timeout | None, on_done: OnDone = None) -> ChatResponse | ChatStream:
        body = chat_body(messages, params, stream, extra_body)
        response = self._send("POST", "/v1/chat/completions", json=body, stream=stream, timeout=timeout)
        if stream:
            return ChatStream(response, on_done)
        result = ChatResponse.from_api(response.json())
        if on_done is not None:
            on_done(result)
        return result

    def session(self, *, system: str | None = None, session_id: str | None = None,
                **defaults: Unpack[ChatParams]) -> Session:
        """A multi-turn conversation; ``defaults`` (e.g. ``temperature=0``) apply to every turn."""
        return Session(self, system=system, session_id=session_id, **defaults)

    # ---- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """A conversation pinned to the server's state cache by a random ``session_id``: each turn
    resends the history (as OpenAI clients do) and the server resumes from its cached state, so
    only the new turn is prefilled (see ``usage.cached_tokens``)."""

    def __init__(self, client: Client, *, system: str | None = None, session_id: str | None = None,
                 **defaults: Unpack[ChatParams]):
        self.client = client
        self._state = SessionState(system, session_id, dict(defaults))

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def messages(self) -> list[dict]:
        """The conversation so far (completed turns only)."""
        return self._state.messages

    @overload
    def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: Literal[False] = False,
            **params: Unpack[ChatParams]) -> ChatResponse: ...

    @overload
    def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: Literal[True],
            **params: Unpack[ChatParams]) -> ChatStream: ...

    def ask(self, text: str, images: list[ImageInput] | None = None, *, stream: bool = False,
            **params: Unpack[ChatParams]) -> ChatResponse | ChatStream:
        """Send a user turn (``images`` go in this turn) and record it with the reply. A streamed
        turn is recorded when its stream completes; one closed early is not recorded."""
        turn, messages, merged = self._state.request(text, images, dict(params))
        return self.client._chat(messages, merged, stream, None, None, self._state.recorder(turn))
