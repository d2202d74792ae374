"""Client behaviour that needs no model: parsing, image encoding, retry decisions, stream errors.

Transport failures are simulated with httpx.MockTransport, since a real server cannot be made to
refuse a connection once and then accept the next one."""

import asyncio
import base64
import email.utils
import io
import time

import httpx
import pytest
from PIL import Image

from vlmamba_client import (APIConnectionError, APITimeoutError, AsyncClient, Client, RetryPolicy, ServerError,
                            parse_metrics, to_image_url)
from vlmamba_client._base import build_messages
from vlmamba_client.errors import parse_retry_after

METRICS = """\
# HELP vlmamba_requests_finished_total Finished requests
# TYPE vlmamba_requests_finished_total counter
vlmamba_requests_finished_total{reason="stop"} 12.0
vlmamba_requests_finished_total{reason="abort"} 1.0
vlmamba_state_slots_total 16.0
vlmamba_ttft_seconds_bucket{le="+Inf"} 3.0 1700000000000
odd{path="C:\\\\x",quote="say \\"hi\\"",nl="a\\nb",brace="}"} NaN
"""


def test_prometheus_text_is_parsed_with_labels_escapes_and_special_values():
    m = parse_metrics(METRICS)
    assert m["vlmamba_state_slots_total"] == 16.0
    assert m.value("vlmamba_requests_finished_total", reason="stop") == 12.0
    assert m[("vlmamba_requests_finished_total", (("reason", "abort"),))] == 1.0
    assert m.value("vlmamba_ttft_seconds_bucket", le="+Inf") == 3.0  # the timestamp is dropped
    [(labels, value)] = m.samples("odd")
    assert labels == {"path": "C:\\x", "quote": 'say "hi"', "nl": "a\nb", "brace": "}"} and value != value
    assert m.value("missing", 0.0) == 0.0 and len(m) == 5


def _png(mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_become_data_urls_with_the_right_mime_type(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    misnamed = tmp_path / "photo.png"
    misnamed.write_bytes(jpeg.getvalue())  # the content wins over the suffix
    assert to_image_url(misnamed).startswith("data:image/jpeg;base64,")
    assert to_image_url(str(misnamed)) == to_image_url(misnamed) == to_image_url(jpeg.getvalue())
    url = to_image_url(Image.new("CMYK", (4, 4)))  # PNG cannot hold CMYK: converted to RGB
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).mode == "RGB"
    assert to_image_url(io.BytesIO(_png())).startswith("data:image/png;base64,")
    for url in ("https://example.com/a.png", "http://x/y.jpg", "data:image/png;base64,AAAA"):
        assert to_image_url(url) == url
    with pytest.raises(FileNotFoundError, match="neither"):
        to_image_url(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match="not a recognised image"):
        to_image_url(b"hello world")
    with pytest.raises(TypeError):
        to_image_url(42)


def test_messages_get_images_in_the_last_user_turn():
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]}]
    out = build_messages(msgs, None, [_png()], "sys")
    assert out[0] == {"role": "system", "content": "sys"} and out[1] == msgs[0]
    assert [p["type"] for p in out[3]["content"]] == ["image_url", "text"]
    assert [p["type"] for p in msgs[2]["content"]] == ["text"]  # the input is not modified
    with pytest.raises(TypeError):
        build_messages(msgs, "and a prompt", None, None)


def test_retry_after_and_backoff():
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after(later) <= 30
    policy = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=4.0)
    assert all(1.0 <= policy.delay(0, 1.0) <= 1.1 for _ in range(50))  # Retry-After is a floor
    assert all(0.25 <= policy.delay(0) <= 0.5 and 2.0 <= policy.delay(9) <= 4.0 for _ in range(50))
    assert not policy.retry_status(429, 0, 3600.0)  # too long to wait: raise instead
    assert policy.retry_status(503, 4, None) and not policy.retry_status(503, 5, None)
    assert not policy.retry_status(500, 0, None)


def test_a_negative_retry_count_is_refused_up_front():
    # It used to make every call end in an AssertionError ("unreachable"), having tried nothing.
    for make in (lambda: RetryPolicy(max_retries=-1), lambda: Client("http://test", max_retries=-1),
                 lambda: AsyncClient("http://test", max_retries=-1)):
        with pytest.raises(ValueError, match="max_retries"):
            make()
    assert _client(lambda request: httpx.Response(200, json={"status": "ok"}), max_retries=0).health().status == "ok"


def _client(handler, **kw) -> Client:
    return Client("http://test", backoff=0.01, http_client=httpx.Client(transport=httpx.MockTransport(handler)),
                  **kw)


def test_connect_errors_and_503_are_retried_but_a_broken_post_is_not():
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "loading"}})
        if request.method == "POST":
            raise httpx.ReadError("connection reset mid-response")
        return httpx.Response(200, json={"status": "ok", "running": 0, "waiting": 0, "slots_used": 0})

    client = _client(flaky, max_retries=3)
    assert client.health().status == "ok" and calls == ["GET"] * 3
    with pytest.raises(APIConnectionError):
        client.chat(prompt="hi")
    assert calls[3:] == ["POST"]  # the server may have done the work: no second POST
    with pytest.raises(ServerError) as e:
        _client(lambda r: httpx.Response(503, json={"error": {"message": "down", "code": "unavailable"}}),
                max_retries=1).health()
    assert e.value.status == 503 and e.value.code == "unavailable"


def test_timeouts_raise_api_timeout_error():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("too slow")

    with pytest.raises(APITimeoutError):
        _client(slow, max_retries=0).chat(prompt="hi")


def _sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


CHUNK = '{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"hel"},"finish_reason":null}]}'
ERROR = '{"error":{"message":"generation failed: boom","type":"server_error","param":null,"code":"internal_error"}}'


def test_a_streamed_error_event_raises_server_error():
    client = _client(lambda r: httpx.Response(200, content=_sse(CHUNK, ERROR)))
    stream = client.chat(prompt="hi", stream=True)
    assert next(stream).text == "hel"
    with pytest.raises(ServerError) as e:
        next(stream)
    assert e.value.code == "internal_error" and e.value.status == 500 and "boom" in e.value.message


def test_a_stream_cut_before_done_raises_connection_error():
    client = _client(lambda r: httpx.Response(200, content=_sse(CHUNK)))
    with pytest.raises(APIConnectionError, match="DONE"):
        client.chat(prompt="hi", stream=True).final()


def test_async_streams_raise_the_same_errors():
    async def run():
        transport = httpx.MockTransport(lambda r: httpx.Response(200, content=_sse(CHUNK, ERROR)))
        async with AsyncClient("http://test", http_client=httpx.AsyncClient(transport=transport)) as ac:
            stream = await ac.chat(prompt="hi", stream=True)
            return [c.text async for c in stream]

    with pytest.raises(ServerError, match="boom"):
        asyncio.run(run())
