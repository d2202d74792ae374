"""A small asynchronous client for any OpenAI-compatible chat server, with retries on 429/503."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})


class RequestFailed(Exception):
    """One request failed for good (after any retries)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Fatal(RequestFailed):
    """Every request would fail the same way (bad key, wrong URL): stop the run."""


def api_base(url: str) -> str:
    """``http://host:port``, ``host:port`` or ``.../v1`` -> ``http://host:port/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds, or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return r.text[:300]


class ChatClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 8,
                 max_wait: float = 120.0):
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(timeout=timeout, headers=headers,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.max_retries, self.max_wait = max_retries, max_wait
        self.retries = 0

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def models(self) -> list[str]:
        """Model ids the server lists ([] if it has no /models). Raises Fatal if it cannot be reached."""
        try:
            r = await self.http.get(self.base + "/models")
        except httpx.TransportError as e:
            raise Fatal(f"cannot reach {self.base}: {e or type(e).__name__}") from e
        if r.status_code in (401, 403):
            raise Fatal(f"{self.base} refused the API key ({r.status_code}: {_error_text(r)}); pass --api-key",
                        r.status_code)
        if r.status_code != 200:
            return []
        try:
            return [m["id"] for m in r.json().get("data", [])]
        except Exception:
            return []

    async def chat(self, body: dict) -> dict:
        """POST /chat/completions; retries 429/502/503/504 and connection errors, honouring Retry-After."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = await self.http.post(self.base + "/chat/completions", json=body)
            except httpx.TransportError as e:
                if last:
                    raise RequestFailed(f"{type(e).__name__}: {e}") from e
                await self._wait(None, attempt)
                continue
            if r.status_code == 200:
                return r.json()
            if r.status_code in FATAL_STATUSES:
                hint = "; pass --api-key" if r.status_code != 404 else "; is --server an OpenAI-compatible server?"
                raise Fatal(f"{r.status_code} from {self.base}/chat/completions: {_error_text(r)}{hint}",
                            r.status_code)
            if r.status_code not in RETRY_STATUSES or last:
                raise RequestFailed(f"{r.status_code}: {_error_text(r)}", r.status_code)
            await self._wait(retry_after(r.headers.get("retry-after")), attempt)
        raise AssertionError("unreachable")

    async def _wait(self, hinted: float | None, attempt: int) -> None:
        self.retries += 1
        delay = hinted if hinted is not None else min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
        await asyncio.sleep(min(delay, self.max_wait))


def answer_text(response: dict) -> tuple[str, str | None]:
    """(message content, finish_reason) of a chat completion."""
    choice = (response.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason")
