"""Turning a user's ``image_url`` into a PIL image, safely.

Two kinds of URL are accepted: ``data:image/...;base64,...`` and ``http(s)://``. Everything about a
remote fetch is treated as hostile input, because the server fetches on the user's behalf:

* **SSRF.** Every hop's host is resolved and refused if *any* of its addresses is loopback, private,
  link-local, CGNAT, multicast, unspecified, reserved or a cloud metadata endpoint (also when spelt as
  ``2130706433``, ``0x7f.0.0.1``, ``::ffff:127.0.0.1`` ...). The connection then goes to the address
  that was checked (see :meth:`ImageFetcher._send`), so DNS cannot change between check and connect.
* **Resource exhaustion.** One deadline covers resolution, all redirects and the body; the body is read
  as a stream and abandoned as soon as it passes ``max_bytes``; the pixel count is checked from the
  header, before any pixel is decoded. Decoding waits for a share of a server-wide pixel budget
  (:class:`PixelBudget`), so the memory that full-size decoded images take is bounded whatever the
  number of requests, and the caller's ``prepare`` (the model's resize) runs in the same worker
  call: a request then holds its images at the model's size, not at the size they were sent.
* **Isolation.** Host lookups and decoding run in the fetcher's own threads: lookups that hang (a slow
  or hostile DNS server) or a burst of decodes wait there, not in the threads that tokenize
  every other request.
* **Privacy.** Error messages and logs name the host, never the path, query string or payload.

All failures are :class:`ImageError` subclasses, i.e. :class:`model.errors.VLMambaError`, so the server
turns them into OpenAI-style error bodies in one place.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import http.cookiejar
import io
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from model.errors import VLMambaError
from server.threads import name_os_thread

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]

# Formats people send to a vision model. Restricting Image.open keeps exotic decoders (EPS shells out to
# Ghostscript, others have a long CVE history) out of reach of untrusted bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


# --------------------------------------------------------------------------------------------- errors
class ImageError(VLMambaError):
    """The image (or its URL) is unusable; base class of every error raised here."""

    status = 400
    code = "invalid_image"


class ImageURLRefused(ImageError):
    """The URL's scheme, host or address is not allowed by the server's policy."""

    code = "image_url_refused"


class ImageTooLarge(ImageError):
    """Too many bytes or too many pixels. 400, not 413: the image is too large, not the request body."""

    code = "image_too_large"


class ImageFetchFailed(ImageError):
    """The remote server could not be reached, or answered with something other than 2xx."""

    status = 502
    type = "upstream_error"
    code = "image_fetch_failed"


class ImageFetchTimeout(ImageFetchFailed):
    """The whole fetch (resolution, redirects and body) took longer than ``timeout_s``."""

    status = 504
    code = "image_fetch_timeout"


# --------------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20          # downloaded / decoded-from-base64 bytes
    max_pixels: int = 40_000_000         # width*height, checked before the pixels are decoded
    timeout_s: float = 10.0              # the whole fetch, redirects included
    max_redirects: int = 3
    allow_private: bool = False          # allow loopback/private/link-local targets (tests, local use)
    allowed_domains: tuple[str, ...] = ()  # host allowlist, suffix match on dot boundaries; empty = any
    max_decoding_pixels: int = 120_000_000  # pixels being decoded at once, all requests together
    # Threads that decode (and prepare) images: one per core, 4 to 16.
    decode_threads: int = field(default_factory=lambda: min(16, max(4, os.cpu_count() or 4)))
    resolver_threads: int = 8            # threads for host lookups; further lookups queue for them

    def __post_init__(self):
        if self.max_decoding_pixels < self.max_pixels:
            raise ValueError(f"max_decoding_pixels ({self.max_decoding_pixels:,}) must be at least max_pixels "
                             f"({self.max_pixels:,}): an image of the largest allowed size could never be decoded")
        if self.decode_threads < 1 or self.resolver_threads < 1:
            raise ValueError("decode_threads and resolver_threads must be at least 1")


@dataclass
class FetchedImage:
    image: Any           # the RGB PIL image of the first frame, or what the fetcher's ``prepare`` made of it
    source: str          # "data" or "http"
    seconds: float       # wall time of fetch + decode (+ prepare)
    nbytes: int          # encoded size


class PixelBudget:
    """Pixels being decoded at once, shared by every request: a weighted first-come, first-served
    semaphore on the event loop. A decoded image takes 3-4 bytes per pixel (more while it is
    converted to RGB), so the budget bounds the memory that decoding takes. Waiters are served in
    arrival order, so a large image is not passed over forever by smaller ones."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)  # read from the metrics' thread too: no iteration

    async def acquire(self, n: int) -> int:
        """Wait for ``n`` pixels (at most the capacity) and return the amount held, for :meth:`release`."""
        n = min(n, self.capacity)
        if not self._waiters and self.in_use + n <= self.capacity:
            self.in_use += n
            return n
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():  # granted as the caller was cancelled
                self.release(n)
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._grant()  # the ones behind may fit now
            raise
        return n

    def release(self, n: int) -> None:
        self.in_use -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and (self._waiters[0][1].done() or self.in_use + self._waiters[0][0] <= self.capacity):
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.in_use += n
                fut.set_result(None)


_METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")          # well-known prefix: embeds an IPv4 address
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use translation prefix
# Refused even with allow_private: metadata services are never an image source, and a resolver answer
# that is not an address must not be handed to httpx, which would resolve it again, unchecked.
_ALWAYS_REFUSED = ("cloud metadata endpoint", "not an IP address")
_IPV4_NUMERIC = re.compile(r"[0-9a-fA-FxX.]+")


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None if it is a host name.

    Besides the canonical forms this accepts every IPv4 spelling that ``inet_aton`` (and therefore
    ``getaddrinfo``, and therefore a connecting client) accepts: ``127.1``, ``2130706433``,
    ``0x7f.0.0.1``, ``017700000001``. Those must be recognised as 127.0.0.1, not passed through as names.
    """
    text = text.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    # inet_aton ignores anything after whitespace, so only hand it strings made of number characters.
    if not _IPV4_NUMERIC.fullmatch(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def address_refusal(ip: str) -> str | None:
    """Why the server must not connect to ``ip`` (e.g. ``"loopback"``), or None for a public address."""
    addr = parse_ip(ip)
    if addr is None:
        return "not an IP address"
    if addr in _METADATA:
        return "cloud metadata endpoint"
    if isinstance(addr, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address get routed to it: judge the IPv4 address.
        if addr in _NAT64_LOCAL:
            return "private"
        embedded = addr.ipv4_mapped or addr.sixtofour or (
            ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else None)
        if embedded is not None:
            return address_refusal(str(embedded))
    checks = (
        ("unspecified", addr.is_unspecified),
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("carrier-grade NAT", isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT),
        ("private", addr.is_private or getattr(addr, "is_site_local", False)),
        ("reserved", addr.is_reserved),
        ("not globally routable", not addr.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """Allowlist match on dot boundaries: ``a.example.com`` matches ``example.com``; ``badexample.com`` doesn't."""
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """The client is shared by all users' requests: never store a cookie from one to send with another."""

    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


# --------------------------------------------------------------------------------------------- decode
def open_image(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    """Untrusted bytes -> a PIL image whose header has been read and checked against ``limits``;
    no pixel is decoded yet. ``what`` names the source in messages."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # PIL's own guard (2x Image.MAX_IMAGE_PIXELS) fires inside open() for absurd sizes.
        raise ImageTooLarge(f"{what} is too large: its dimensions exceed the decoder's safety limit") from None
    except Exception:
        raise ImageError(f"{what} is not a decodable image (supported formats: "
                         f"{', '.join(ALLOWED_FORMATS)})") from None
    width, height = img.size  # known from the header; no pixel has been decoded yet
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                            f"{limits.max_pixels:,} pixels")
    return img


def finish_image(img: Image.Image, what: str, prepare: Callable[[Image.Image], Any] | None = None) -> Any:
    """Decode an image from :func:`open_image`: the RGB image of its first frame, or ``prepare(it)``."""
    try:
        img.seek(0)  # animated images: the first frame only
        img.load()
        rgb = img.convert("RGB")
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{what} is too large: it exceeds the decoder's safety limit") from None
    except Exception:
        raise ImageError(f"{what} is not a decodable image: the data is truncated or corrupt") from None
    finally:
        img.close()
    return prepare(rgb) if prepare is not None else rgb


def decode_image(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    """Untrusted bytes -> RGB image of the first frame. ``what`` names the source in messages."""
    return finish_image(open_image(data, limits, what), what)


def _open_data_url(url: str, limits: ImageLimits) -> tuple[Image.Image, int]:
    """``data:image/<type>;base64,<payload>`` -> (image from :func:`open_image`, decoded byte count)."""
    header, sep, payload = url.partition(",")
    params = header[len("data:"):].lower().split(";")
    if not sep or params[-1] != "base64":
        raise ImageError("data URL images must be base64-encoded: data:image/<type>;base64,<data>")
    if not params[0].startswith("image/"):
        raise ImageError(f"data URL media type {params[0][:50]!r} is not an image type")
    if len(payload) // 4 * 3 > limits.max_bytes + 3:  # cheap estimate before decoding anything
        raise ImageTooLarge(_bytes_message("the data URL image", limits.max_bytes))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid base64 in data URL") from None
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(_bytes_message("the data URL image", limits.max_bytes))
    return open_image(data, limits, "the data URL image"), len(data)


def _label(host: str) -> str:
    """A host name as shown in messages: bounded, since it comes from the user."""
    return host if len(host) <= 100 else host[:97] + "..."


def _bytes_message(what: str, max_bytes: int) -> str:
    return f"{what} is larger than the limit of {max_bytes:,} bytes ({max_bytes / 2**20:g} MiB)"


# --------------------------------------------------------------------------------------------- fetch
class ImageFetcher:
    """Fetches and decodes images under :class:`ImageLimits`. One per server; safe for concurrent use.

    ``prepare`` (PIL RGB image -> anything, e.g. the model's resize) runs in the decoding thread,
    under the pixel budget; :attr:`FetchedImage.image` is then its result. ``resolver`` (async host
    -> list of IP strings) and ``transport`` (an httpx transport) exist for tests.
    """

    def __init__(self, limits: ImageLimits | None = None, resolver: Resolver | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 prepare: Callable[[Image.Image], Any] | None = None):
        self.limits = limits or ImageLimits()
        self.prepare = prepare
        self.budget = PixelBudget(self.limits.max_decoding_pixels)
        self._resolve = resolver or self._system_resolve
        self._domains = tuple(d.strip().rstrip(".").lower() for d in self.limits.allowed_domains if d.strip())
        self._decoders = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="vlmamba-image",
                                            initializer=name_os_thread)
        self._resolvers = ThreadPoolExecutor(self.limits.resolver_threads, thread_name_prefix="vlmamba-dns",
                                             initializer=name_os_thread)
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,        # redirects are followed by hand, each hop checked
            trust_env=False,               # an env proxy would connect (and resolve) on our behalf
            timeout=httpx.Timeout(self.limits.timeout_s),  # backstop; the real deadline is in fetch()
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
            # Pools are keyed by IP once URLs are pinned: a kept-alive TLS connection verified for one
            # host name could otherwise carry a request for another host at the same address.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": "vlmamba-serve image fetcher", "Accept": "image/*",
                     # Compressed bodies would be inflated before the byte cap sees them.
                     "Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
        # Lookups hung in the system resolver are not waited for; queued work is dropped.
        self._resolvers.shutdown(wait=False, cancel_futures=True)
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, url: str, *, param: str | None = None) -> FetchedImage:
        """Fetch and decode ``url``. Raises an :class:`ImageError` subclass, with ``param`` attached."""
        try:
            return await self._fetch(url.strip())
        except VLMambaError as err:
            err.param = err.param or param
            raise

    async def _fetch(self, url: str) -> FetchedImage:
        start = time.perf_counter()
        if url[:5].lower() == "data:":
            img, nbytes = await self._in_thread(self._decoders, _open_data_url, url, self.limits)
            image = await self._decode(img, "the data URL image")
            return FetchedImage(image, "data", time.perf_counter() - start, nbytes)
        target = self._parse(url)
        host = _label(target.raw_host.decode("ascii"))
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                data, final_host = await self._download(target)
            host = _label(final_host)
        except (TimeoutError, httpx.TimeoutException):
            raise ImageFetchTimeout(f"fetching the image from {host} (redirects included) took longer "
                                    f"than the {self.limits.timeout_s:g} s limit") from None
        what = f"the image from {host}"
        image = await self._decode(await self._in_thread(self._decoders, open_image, data, self.limits, what), what)
        seconds = time.perf_counter() - start
        log.debug("fetched image host=%s bytes=%d seconds=%.3f", host, len(data), seconds)
        return FetchedImage(image, "http", seconds, len(data))

    async def _decode(self, img: Image.Image, what: str) -> Any:
        """Decode (and prepare) an opened image once its pixels fit in the budget. The pixels are
        given back when the worker is done with them, also when the caller is cancelled first."""
        width, height = img.size
        held = await self.budget.acquire(width * height)
        loop = asyncio.get_running_loop()

        def give_back(_: Future) -> None:
            try:
                loop.call_soon_threadsafe(self.budget.release, held)
            except RuntimeError:  # the loop has closed: nothing is left to wait for the budget
                pass

        try:
            job = self._decoders.submit(finish_image, img, what, self.prepare)
        except BaseException:
            self.budget.release(held)
            raise
        job.add_done_callback(give_back)
        return await asyncio.wrap_future(job)

    @staticmethod
    async def _in_thread(pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _system_resolve(self, host: str) -> list[str]:
        """The system resolver's addresses for ``host``, looked up in the fetcher's own threads."""
        infos = await self._in_thread(self._resolvers, socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
        return [info[4][0] for info in infos]

    @staticmethod
    def _parse(url: str, base: httpx.URL | None = None) -> httpx.URL:
        """Parse ``url`` (relative to ``base``, for redirects) and check what needs no network: the
        scheme, that there is a host, and that there are no credentials."""
        redirect = base is not None
        try:
            target = base.join(url) if redirect else httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise ImageError("the image URL is not a valid URL", code="invalid_image_url") from None
        if target.scheme not in ("http", "https"):
            scheme = (target.scheme or "(none)")[:20]
            allowed = "http or https" if redirect else "http, https or a base64 data: URL"
            raise ImageURLRefused(f"image URL scheme {scheme!r} is not allowed; use {allowed}")
        if not target.raw_host:
            raise ImageError("the image URL has no host", code="invalid_image_url")
        if target.port is not None and not 0 < target.port < 65536:
            raise ImageError("the image URL's port is not between 1 and 65535", code="invalid_image_url")
        try:  # empty or over-long labels ("a..b", 64 characters), which the resolver cannot encode
            target.host.rstrip(".").encode("idna")
        except UnicodeError:
            raise ImageError("the image URL's host is not a valid host name", code="invalid_image_url") from None
        if target.userinfo:
            raise ImageURLRefused("image URLs must not contain credentials (user:password@)")
        return target

    async def _download(self, url: httpx.URL) -> tuple[bytes, str]:
        """GET ``url`` following at most ``max_redirects`` redirects; returns (body, final host)."""
        for hop in range(self.limits.max_redirects + 1):
            host = url.raw_host.decode("ascii")
            ip = await self._check_host(host)
            response = await self._send(url, host, ip)
            try:
                if not response.is_redirect:
                    return await self._read_body(response, host), host
                if hop == self.limits.max_redirects:
                    raise ImageFetchFailed(f"the image URL redirected more than "
                                           f"{self.limits.max_redirects} times (last host {_label(host)})")
                url = self._parse(response.headers["Location"], base=url)
            finally:
                await response.aclose()
        raise AssertionError("unreachable")

    async def _check_host(self, host: str) -> str:
        """Apply the allowlist and the address policy to ``host``; returns the IP to connect to."""
        name = host.rstrip(".").lower()
        if not _host_allowed(name, self._domains):
            raise ImageURLRefused(f"image host {_label(name)} is not in the server's list of allowed domains")
        literal = parse_ip(name)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = list(dict.fromkeys(await self._resolve(name)))
            except (OSError, UnicodeError):
                addresses = []
            if not addresses:
                raise ImageFetchFailed(f"could not resolve image host {_label(name)}")
        for ip in addresses:  # any bad address refuses the host: we must not depend on which one is used
            reason = address_refusal(ip)
            if reason and (not self.limits.allow_private or reason in _ALWAYS_REFUSED):
                raise ImageURLRefused(f"image host {_label(name)} resolves to a {reason} address, "
                                      f"which the server does not fetch from")
        return str(parse_ip(addresses[0]))

    async def _send(self, url: httpx.URL, host: str, ip: str) -> httpx.Response:
        """Send the GET to ``ip``, the checked address, while presenting ``host`` to the server.

        Rewriting the URL's host to the IP means httpx never resolves anything, so there is no DNS-rebinding
        window between the check and the connection. The original name still goes in the ``Host`` header
        and, for https, in SNI (the ``sni_hostname`` extension), which is also the name the certificate is
        verified against.
        """
        extensions = {}
        if url.scheme == "https" and parse_ip(host) is None:
            extensions["sni_hostname"] = host.rstrip(".")  # certificates name hosts without the root dot
        try:
            request = self._client.build_request("GET", url.copy_with(host=ip),
                                                 headers={"Host": url.netloc.decode("ascii")},
                                                 extensions=extensions)
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise
        except httpx.InvalidURL:
            # httpx parses a redirect's Location even with follow_redirects=False (for next_request).
            raise ImageFetchFailed(f"could not fetch the image from {_label(host)}: the server answered "
                                   f"with an invalid redirect location") from None
        except httpx.HTTPError as err:
            raise ImageFetchFailed(f"could not fetch the image from {_label(host)}: "
                                   f"{type(err).__name__}") from None
        if not (response.is_success or response.is_redirect):
            await response.aclose()
            raise ImageFetchFailed(f"could not fetch the image from {_label(host)}: the server answered "
                                   f"HTTP {response.status_code}")
        return response

    async def _read_body(self, response: httpx.Response, host: str) -> bytes:
        """The body, read as a stream and abandoned as soon as it exceeds ``max_bytes``."""
        what, cap = f"the image from {_label(host)}", self.limits.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(_bytes_message(what, cap))
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > cap:
                    raise ImageTooLarge(_bytes_message(what, cap))
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as err:
            raise ImageFetchFailed(f"the connection to {_label(host)} failed while reading the image: "
                                   f"{type(err).__name__}") from None
        return bytes(body)
