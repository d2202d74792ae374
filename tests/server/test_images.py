"""Tests for server/images.py: decoding, limits and the SSRF policy of ImageFetcher.

Network safety of the tests themselves: every fetcher is built with either ``LoopbackOnly`` (a real transport
that fails the test before sending to anything but a loopback IP) or an ``httpx.MockTransport`` (sends
nothing), and with a fake resolver, so no test can reach beyond 127.0.0.1 even if the guard under test broke.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import urllib.parse
import zlib

import httpx
import pytest
from PIL import Image

from model.errors import VLMambaError
from server.images import (FetchedImage, ImageError, ImageFetchFailed, ImageFetcher, ImageFetchTimeout,
                           ImageLimits, ImageTooLarge, ImageURLRefused, PixelBudget, address_refusal)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


# ------------------------------------------------------------------------------------------ payloads
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height``: tiny on the wire, huge if decoded."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"  # 8-byte signature, 4-byte length, then the chunk type
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC covers type + 13 data bytes
    return bytes(data)


PNG = encode(Image.new("RGB", (32, 24), RED), "PNG")
JPEG = encode(Image.new("RGB", (32, 24), GREEN), "JPEG", quality=95)
GIF = encode(Image.new("RGB", (16, 16), RED), "GIF", save_all=True,
             append_images=[Image.new("RGB", (16, 16), BLUE)], duration=100, loop=0)
NOISE_PNG = encode(Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48), "PNG")
TRUNCATED_PNG = NOISE_PNG[: len(NOISE_PNG) // 2]
BOMB_PNG = png_declaring(20000, 20000)     # over PIL's own DecompressionBombError threshold
BIG_DIMS_PNG = png_declaring(8000, 8000)   # 64 Mpx: under PIL's threshold, over our 40 Mpx default


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


# ------------------------------------------------------------------------------------------ local server
class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the fixtures above; records (path, Host header) of every request in ``server.log``."""

    BODIES = {"/png": (PNG, "image/png"), "/jpeg": (JPEG, "image/jpeg"), "/gif": (GIF, "image/gif"),
              "/text": (b"hello, I am not an image", "text/plain"),
              "/truncated": (TRUNCATED_PNG, "image/png"), "/bomb": (BOMB_PNG, "image/png"),
              "/big-dims": (BIG_DIMS_PNG, "image/png"), "/large": (b"\0" * 5000, "image/png")}

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        self.server.log.append((url.path, self.headers.get("Host")))
        if url.path in self.BODIES:
            body, ctype = self.BODIES[url.path]
            return self.reply(200, body, ctype)
        if url.path.startswith("/r/"):  # /r/N: N redirects, the last one to /png
            n = int(url.path[3:])
            return self.redirect("/png" if n <= 1 else f"/r/{n - 1}")
        if url.path == "/redirect":
            return self.redirect(urllib.parse.parse_qs(url.query)["to"][0])
        if url.path == "/slow":  # no answer until long after any test timeout
            return self.wait(3.0)
        if url.path == "/drip":  # a prompt answer whose body trickles in forever
            return self.drip()
        if url.path == "/endless":  # no Content-Length and a body with no end
            return self.endless()
        self.reply(404, b"not found", "text/plain")

    def reply(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def wait(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.server.closing.is_set():
            time.sleep(0.05)

    def drip(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for _ in range(30):
            if self.server.closing.is_set():
                return
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(0.1)

    def endless(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for _ in range(1000):  # 64 MiB at most, should the client keep reading (a failure in itself)
            self.wfile.write(b"\0" * 65536)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body is the point of several tests


@pytest.fixture(scope="module")
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.log, srv.closing = [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.port = srv.server_address[1]
    srv.base = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.closing.set()
    srv.shutdown()
    srv.server_close()


# ------------------------------------------------------------------------------------------ test doubles
class LoopbackOnly(httpx.AsyncBaseTransport):
    """A real transport that fails the test, before any I/O, for a request to anything but a loopback IP."""

    def __init__(self):
        self.inner, self.hosts = httpx.AsyncHTTPTransport(), []

    async def handle_async_request(self, request):
        host = request.url.host
        self.hosts.append(host)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name: httpx would resolve it, which the fetcher must never let happen
        if not loopback:
            pytest.fail(f"the fetcher tried to connect to {host!r}")  # BaseException: not swallowed
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


class FakeResolver:
    """Host -> addresses from a dict; unknown names fail like getaddrinfo. Records the names asked for."""

    def __init__(self, table=None):
        self.table, self.calls = table or {}, []

    async def __call__(self, host):
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


SYSTEM = object()  # pass as resolver= to use the real getaddrinfo


def fetch(url, *, resolver=None, transport=None, param=None, **limits) -> FetchedImage:
    """Run one fetch with a fresh fetcher (fake resolver and loopback-only transport unless given)."""

    async def go():
        res = None if resolver is SYSTEM else (resolver or FakeResolver())
        async with ImageFetcher(ImageLimits(**limits), resolver=res, transport=transport or LoopbackOnly()) as f:
            return await f.fetch(url, param=param)

    return asyncio.run(go())


def colour_close(pixel, expected, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


# ------------------------------------------------------------------------------------------ address policy
REFUSED = ["127.0.0.1", "127.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "10.0.0.1", "172.16.5.4",
           "172.31.255.255", "192.168.1.1", "169.254.169.254", "169.254.1.1", "100.64.0.1", "100.127.255.254",
           "100.100.100.200", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "::1", "::",
           "fe80::1", "fc00::1", "fd12:3456::1", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1",
           "::ffff:169.254.169.254", "::ffff:10.0.0.1", "[::1]", "2130706433", "0x7f000001", "017700000001",
           "0177.0.0.1", "0x7f.0.0.1", "0x7f.1", "0", "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "fec0::1",
           "not-an-ip", "127.0.0.1 public.example"]


@pytest.mark.parametrize("ip", REFUSED)
def test_address_refusal_refuses(ip):
    assert address_refusal(ip) is not None


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111",
                                "2001:4860:4860::8888", "64:ff9b::808:808"])
def test_address_refusal_allows_public(ip):
    assert address_refusal(ip) is None  # classified only; nothing is contacted


@pytest.mark.parametrize("ip, reason", [("127.1", "loopback"), ("2130706433", "loopback"),
                                        ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "cloud metadata"),
                                        ("fd00:ec2::254", "cloud metadata"), ("100.64.0.1", "carrier-grade NAT"),
                                        ("fe80::1", "link-local"), ("10.0.0.1", "private"),
                                        ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified")])
def test_address_refusal_reasons(ip, reason):
    assert reason in address_refusal(ip)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls, status, type_, code", [
    (ImageError, 400, "invalid_request_error", "invalid_image"),
    (ImageURLRefused, 400, "invalid_request_error", "image_url_refused"),
    (ImageTooLarge, 400, "invalid_request_error", "image_too_large"),
    (ImageFetchFailed, 502, "upstream_error", "image_fetch_failed"),
    (ImageFetchTimeout, 504, "upstream_error", "image_fetch_timeout"),
])
def test_error_classes(cls, status, type_, code):
    err = cls("message")
    assert isinstance(err, VLMambaError) and isinstance(err, ImageError)
    assert (err.status, err.type, err.code, err.message) == (status, type_, code, "message")


def test_param_is_attached_to_errors():
    with pytest.raises(ImageURLRefused) as info:
        fetch("file:///etc/passwd", param="messages[0].content[1].image_url")
    assert info.value.param == "messages[0].content[1].image_url"


# ------------------------------------------------------------------------------------------ data URLs
def test_data_url_png():
    got = fetch(data_url(PNG))
    assert (got.source, got.nbytes, got.image.mode, got.image.size) == ("data", len(PNG), "RGB", (32, 24))
    assert got.image.getpixel((0, 0)) == RED and got.seconds >= 0


def test_data_url_case_insensitive_header():
    assert fetch(data_url(PNG, "IMAGE/PNG").replace("data:", "DATA:", 1)).image.size == (32, 24)


def test_data_url_bad_base64_message_has_no_payload():
    with pytest.raises(ImageError, match="invalid base64 in data URL") as info:
        fetch("data:image/png;base64,iVBORw0KGgo!!!notbase64$$$")
    assert "notbase64" not in info.value.message and info.value.code == "invalid_image"


def test_data_url_not_an_image():
    with pytest.raises(ImageError, match="not a decodable image"):
        fetch(data_url(b"just some text, definitely not pixels"))


@pytest.mark.parametrize("url", ["data:image/png,rawbytes", "data:text/plain;base64,aGVsbG8=", "data:image/png"])
def test_data_url_malformed_or_not_image_type(url):
    with pytest.raises(ImageError) as info:
        fetch(url)
    assert type(info.value) is ImageError


def test_data_url_too_many_bytes():
    with pytest.raises(ImageTooLarge, match="1,000 bytes"):
        fetch(data_url(b"\0" * 5000), max_bytes=1000)


def test_data_url_too_many_pixels_checked_before_decode():
    with pytest.raises(ImageTooLarge, match="8000x8000.*40,000,000"):
        fetch(data_url(BIG_DIMS_PNG))
    with pytest.raises(ImageTooLarge):
        fetch(data_url(BOMB_PNG))  # PIL's own DecompressionBombError, mapped


# ------------------------------------------------------------------------------------------ schemes, URLs
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/_x",
                                 "javascript:alert(1)", "dict://127.0.0.1:11211/", "//127.0.0.1/x.png",
                                 "/etc/passwd"])
def test_other_schemes_refused(url):
    with pytest.raises(ImageURLRefused, match="scheme"):
        fetch(url, allow_private=True)


def test_credentials_in_url_refused(server):
    with pytest.raises(ImageURLRefused, match="credentials"):
        fetch(f"http://user:secret@127.0.0.1:{server.port}/png", allow_private=True)


@pytest.mark.parametrize("url", ["http://", "http://[::1/x", ""])
def test_invalid_urls(url):
    with pytest.raises(ImageError):
        fetch(url)


@pytest.mark.parametrize("url,match", [("http://a..b/x.png", "host name"), ("http://.com/", "host name"),
                                       ("http://" + "a" * 64 + ".com/", "host name"),
                                       ("http://127.0.0.1:99999/x.png", "port"), ("http://127.0.0.1:0/x.png", "port")])
def test_hosts_and_ports_no_resolver_or_socket_takes_are_invalid_urls(url, match):
    # Before, the resolver's UnicodeError and the socket's OverflowError escaped as 500s.
    with pytest.raises(ImageError, match=match) as err:
        fetch(url, allow_private=True)
    assert err.value.status == 400 and err.value.code == "invalid_image_url"


# ------------------------------------------------------------------------------------------ fetching
def test_fetch_png(server):
    got = fetch(f"{server.base}/png", allow_private=True)
    assert (got.source, got.nbytes, got.image.mode) == ("http", len(PNG), "RGB")
    assert got.image.getpixel((5, 5)) == RED


def test_fetch_jpeg(server):
    assert colour_close(fetch(f"{server.base}/jpeg", allow_private=True).image.getpixel((5, 5)), GREEN)


def test_fetch_animated_gif_takes_first_frame(server):
    img = fetch(f"{server.base}/gif", allow_private=True).image
    assert img.mode == "RGB" and colour_close(img.getpixel((8, 8)), RED)


@pytest.mark.parametrize("path", ["/text", "/truncated"])
def test_fetch_undecodable(server, path):
    with pytest.raises(ImageError, match="not a decodable image") as info:
        fetch(f"{server.base}{path}", allow_private=True)
    assert info.value.status == 400


@pytest.mark.parametrize("path, match", [("/big-dims", "40,000,000 pixels"), ("/bomb", "too large")])
def test_fetch_too_many_pixels(server, path, match):
    with pytest.raises(ImageTooLarge, match=match):
        fetch(f"{server.base}{path}", allow_private=True)


def test_fetch_404_message_names_status_not_query(server):
    with pytest.raises(ImageFetchFailed, match="HTTP 404") as info:
        fetch(f"{server.base}/missing?token=SECRET", allow_private=True)
    assert info.value.status == 502 and "SECRET" not in info.value.message and "127.0.0.1" in info.value.message


def test_fetch_connection_refused():
    with socket.socket() as s:  # a port that was free a moment ago and is now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageFetchFailed):
        fetch(f"http://127.0.0.1:{port}/png", allow_private=True)


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_fetch_timeout_covers_headers_and_body(server, path):
    start = time.monotonic()
    with pytest.raises(ImageFetchTimeout, match="0.5 s") as info:
        fetch(f"{server.base}{path}", allow_private=True, timeout_s=0.5)
    assert info.value.status == 504 and time.monotonic() - start < 2.0


@pytest.mark.parametrize("path", ["/large", "/endless"])  # declared Content-Length / streamed without one
def test_fetch_byte_cap(server, path):
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match="1,000 bytes"):
        fetch(f"{server.base}{path}", allow_private=True, max_bytes=1000)
    assert time.monotonic() - start < 2.0  # stopped reading rather than draining 64 MiB


def test_fetcher_is_reusable(server):
    async def go():
        async with ImageFetcher(ImageLimits(allow_private=True), resolver=FakeResolver(),
                                transport=LoopbackOnly()) as f:
            return await asyncio.gather(*(f.fetch(f"{server.base}/{p}") for p in ("png", "jpeg", "gif", "png")))

    assert [r.image.size for r in asyncio.run(go())] == [(32, 24), (32, 24), (16, 16), (32, 24)]


# ------------------------------------------------------------------------------------------ address policy, end to end
def test_loopback_refused_without_allow_private(server):
    before = len(server.log)
    with pytest.raises(ImageURLRefused, match="loopback"):
        fetch(f"{server.base}/png")
    assert len(server.log) == before  # refused before connecting


@pytest.mark.parametrize("host", ["2130706433", "0x7f.0.0.1", "017700000001", "127.1", "[::ffff:127.0.0.1]",
                                  "[::1]", "0.0.0.0", "localhost.", "LOCALHOST"])
def test_loopback_spellings_refused(server, host):
    resolver = FakeResolver({"localhost": ["127.0.0.1", "::1"]})
    with pytest.raises(ImageURLRefused):
        fetch(f"http://{host}:{server.port}/png", resolver=resolver)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.0.0.1", "017700000001", "127.1"])
def test_numeric_ipv4_forms_are_normalised_not_resolved(server, host):
    """With allow_private these reach 127.0.0.1 (the guard transport proves where the connection went)."""
    resolver = FakeResolver()
    assert fetch(f"http://{host}:{server.port}/png", resolver=resolver, allow_private=True).image.size == (32, 24)
    assert resolver.calls == [] and server.log[-1] == ("/png", f"{host}:{server.port}")


def test_system_resolver_localhost_refused(server):
    try:
        socket.getaddrinfo("localhost", None)
    except OSError:
        pytest.skip("localhost does not resolve here")
    with pytest.raises(ImageURLRefused, match="loopback"):
        fetch(f"http://localhost:{server.port}/png", resolver=SYSTEM)


def test_connects_to_checked_ip_with_original_host_header(server):
    resolver, transport = FakeResolver({"images.test": ["127.0.0.1"]}), LoopbackOnly()
    got = fetch(f"http://images.test:{server.port}/png", resolver=resolver, transport=transport,
                allow_private=True)
    assert got.image.size == (32, 24) and resolver.calls == ["images.test"]
    assert transport.hosts == ["127.0.0.1"] and server.log[-1] == ("/png", f"images.test:{server.port}")


def test_any_private_address_refuses_host():
    resolver = FakeResolver({"mixed.test": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(ImageURLRefused, match="mixed.test.*private"):
        fetch("http://mixed.test/png", resolver=resolver, transport=httpx.MockTransport(_unreachable))


def test_unresolvable_host():
    with pytest.raises(ImageFetchFailed, match="resolve.*nowhere.test"):
        fetch("http://nowhere.test/png", transport=httpx.MockTransport(_unreachable))


def test_metadata_refused_even_with_allow_private():
    for host in ("169.254.169.254", "[fd00:ec2::254]", "100.100.100.200"):
        with pytest.raises(ImageURLRefused, match="metadata"):
            fetch(f"http://{host}/latest/meta-data/", allow_private=True)


def _unreachable(request):
    pytest.fail(f"no request should have been sent, got one for {request.url.host}")


def _public_mock(responses):
    """A MockTransport answering pinned requests for a pretend public host; sends nothing anywhere."""
    seen = []

    def handler(request):
        seen.append(request)
        status, headers, body = responses[request.url.path]
        return httpx.Response(status, headers=headers, content=body)

    return httpx.MockTransport(handler), seen


def test_public_host_is_pinned_with_host_header_and_sni():
    transport, seen = _public_mock({"/img.png": (200, {"Content-Type": "image/png"}, PNG)})
    resolver = FakeResolver({"public.test": ["93.184.216.34"]})
    assert fetch("https://public.test/img.png?sig=abc", resolver=resolver, transport=transport).nbytes == len(PNG)
    (request,) = seen
    assert request.url.host == "93.184.216.34" and request.url.query == b"sig=abc"
    assert request.headers["Host"] == "public.test" and request.extensions["sni_hostname"] == "public.test"


# ------------------------------------------------------------------------------------------ redirects
def test_redirect_chain_within_limit(server):
    got = fetch(f"{server.base}/r/3", allow_private=True, max_redirects=3)
    assert got.image.size == (32, 24)
    assert [p for p, _ in server.log[-4:]] == ["/r/3", "/r/2", "/r/1", "/png"]


def test_redirect_chain_over_limit(server):
    with pytest.raises(ImageFetchFailed, match="more than 3"):
        fetch(f"{server.base}/r/4", allow_private=True, max_redirects=3)
    assert server.log[-1][0] == "/r/1"  # the fourth redirect was not followed


@pytest.mark.parametrize("target, error", [("file:///etc/passwd", ImageURLRefused),
                                           ("http://169.254.169.254/latest/meta-data/", ImageURLRefused),
                                           ("data:image/png;base64,AAAA", ImageError),
                                           ("http://internal.test/x", ImageFetchFailed)])
def test_redirect_to_disallowed_target(server, target, error):
    """Each hop is checked like the first (internal.test does not resolve: no DNS leaves the test)."""
    with pytest.raises(error):
        fetch(f"{server.base}/redirect?to={urllib.parse.quote(target)}", allow_private=True)


def test_redirect_from_public_host_to_loopback_refused(server):
    location = f"http://127.0.0.1:{server.port}/png"
    transport, seen = _public_mock({"/img": (302, {"Location": location}, b"")})
    before = len(server.log)
    with pytest.raises(ImageURLRefused, match="loopback"):
        fetch("http://public.test/img", resolver=FakeResolver({"public.test": ["93.184.216.34"]}),
              transport=transport)
    assert len(seen) == 1 and len(server.log) == before


def test_redirect_to_name_resolving_private_refused():
    transport, seen = _public_mock({"/img": (301, {"Location": "http://rebind.test/img"}, b"")})
    resolver = FakeResolver({"public.test": ["93.184.216.34"], "rebind.test": ["192.168.0.10"]})
    with pytest.raises(ImageURLRefused, match="rebind.test.*private"):
        fetch("http://public.test/img", resolver=resolver, transport=transport)
    assert len(seen) == 1


# ------------------------------------------------------------------------------------------ allowlist
def _allowlist_resolver():
    names = ["images.test", "cdn.images.test", "evilimages.test", "images.test.evil.test", "other.test"]
    return FakeResolver({n: ["127.0.0.1"] for n in names})


@pytest.mark.parametrize("host", ["images.test", "cdn.images.test", "CDN.Images.Test."])
def test_allowlist_allows_domain_and_subdomains(server, host):
    got = fetch(f"http://{host}:{server.port}/png", resolver=_allowlist_resolver(), allow_private=True,
                allowed_domains=("images.test",))
    assert got.image.size == (32, 24)


@pytest.mark.parametrize("host", ["evilimages.test", "images.test.evil.test", "other.test", "127.0.0.1"])
def test_allowlist_refuses_others_before_resolving(server, host):
    resolver = _allowlist_resolver()
    with pytest.raises(ImageURLRefused, match="allowed domains"):
        fetch(f"http://{host}:{server.port}/png", resolver=resolver, allow_private=True,
              allowed_domains=("images.test",))
    assert resolver.calls == []


def test_allowlist_applies_to_redirects(server):
    target = urllib.parse.quote(f"http://other.test:{server.port}/png")
    with pytest.raises(ImageURLRefused, match="other.test.*allowed domains"):
        fetch(f"http://images.test:{server.port}/redirect?to={target}", resolver=_allowlist_resolver(),
              allow_private=True, allowed_domains=("images.test",))


# ------------------------------------------------------------------------------------------ decoding budget
def test_pixel_budget_serves_waiters_in_arrival_order_and_forgets_cancelled_ones():
    async def main():
        budget, order = PixelBudget(100), []

        async def take(name, n, hold):
            got = await budget.acquire(n)
            order.append(name)
            await hold.wait()
            budget.release(got)

        holds = {k: asyncio.Event() for k in "abcd"}
        a = asyncio.create_task(take("a", 60, holds["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(take("b", 50, holds["b"]))
        c = asyncio.create_task(take("c", 10, holds["c"]))  # fits now, but b came first
        await asyncio.sleep(0.01)
        assert order == ["a"] and budget.in_use == 60 and budget.waiting == 2
        b.cancel()  # a waiter that gives up: the one behind it is served at once
        await asyncio.sleep(0.01)
        assert order == ["a", "c"] and budget.in_use == 70 and budget.waiting == 0
        d = asyncio.create_task(take("d", 500, holds["d"]))  # more than the capacity: all of it
        await asyncio.sleep(0.01)
        assert budget.waiting == 1
        holds["a"].set()
        holds["c"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "c", "d"] and budget.in_use == 100
        holds["d"].set()
        await asyncio.gather(a, c, d)
        assert b.cancelled() and budget.in_use == 0 and budget.waiting == 0

    asyncio.run(main())


def test_pixel_budget_takes_back_a_grant_whose_waiter_was_cancelled():
    async def main():
        budget = PixelBudget(10)
        first = await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(4))
        await asyncio.sleep(0)
        budget.release(first)  # grants the waiter ...
        waiter.cancel()         # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.in_use == 0

    asyncio.run(main())


def test_decoding_waits_for_the_budget_and_frees_it_when_the_worker_is_done():
    """Pixels stay counted while a worker decodes them, also after the fetch that asked for them
    was cancelled; the next image waits until then. ``prepare`` runs in the worker, and its
    result is what the fetch returns."""
    gate, entered = threading.Event(), threading.Event()

    def prepare(img):
        entered.set()
        gate.wait(10)
        return ("prepared", img.size)

    async def main():
        limits = ImageLimits(max_pixels=32 * 24, max_decoding_pixels=1000)
        async with ImageFetcher(limits, resolver=FakeResolver(), transport=LoopbackOnly(), prepare=prepare) as f:
            first = asyncio.create_task(f.fetch(data_url(PNG)))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            second = asyncio.create_task(f.fetch(data_url(PNG)))
            await asyncio.sleep(0.05)
            assert f.budget.in_use == 32 * 24 and f.budget.waiting == 1
            first.cancel()
            await asyncio.sleep(0.05)
            assert f.budget.in_use == 32 * 24 and f.budget.waiting == 1 and not second.done()
            gate.set()  # the first worker finishes; its pixels go back; the second decodes
            got = await second
            assert first.cancelled() and got.image == ("prepared", (32, 24)) and got.source == "data"
            assert f.budget.in_use == 0

    asyncio.run(main())


def test_decoding_budget_must_hold_the_largest_image():
    with pytest.raises(ValueError, match="max_decoding_pixels"):
        ImageLimits(max_pixels=1000, max_decoding_pixels=999)
