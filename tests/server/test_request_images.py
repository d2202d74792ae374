"""How a request's images are fetched together (server.serving.ChatService._images_and_messages)."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from server.images import ImageError
from server.protocol import ChatCompletionRequest
from server.serving import ChatService


class _Counter:
    def labels(self, *_):
        return self

    def inc(self):
        pass

    def observe(self, _):
        pass


def _service(fetch):
    service = ChatService.__new__(ChatService)
    service.fetcher = SimpleNamespace(fetch=fetch)
    service.metrics = SimpleNamespace(fetch_failures=_Counter(), fetch=_Counter())
    return service


def _request(urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Hi"}]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])


def test_one_failed_image_cancels_the_requests_other_fetches():
    cancelled, started = [], []

    async def fetch(url):
        started.append(url)
        if url.endswith("bad"):
            await asyncio.sleep(0.01)
            raise ImageError("the image URL is not a valid URL", code="invalid_image_url")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(url)
            raise
        return SimpleNamespace(image=url, seconds=0.0)

    async def main():
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match="not a valid URL"):  # the error itself, not a group of them
            await _service(fetch)._images_and_messages(_request(urls))
        assert time.perf_counter() - t0 < 2
        await asyncio.sleep(0.05)  # the loop still runs: the other fetches must be gone by now
        return list(cancelled)

    urls = ["http://a/slow1", "http://a/slow2", "http://a/bad", "http://a/slow3"]
    gone = asyncio.run(main())
    assert len(started) == 4 and sorted(gone) == ["http://a/slow1", "http://a/slow2", "http://a/slow3"]


def test_images_come_back_in_the_order_of_their_parts():
    async def fetch(url):
        await asyncio.sleep(0.05 if url.endswith("1") else 0.0)  # the first finishes last
        return SimpleNamespace(image=url, seconds=0.0)

    urls = ["http://a/1", "http://a/2", "http://a/3"]
    messages, images = asyncio.run(_service(fetch)._images_and_messages(_request(urls)))
    assert images == urls and [p["type"] for p in messages[0]["content"]] == ["image"] * 3 + ["text"]
