"""A minimal HTTP/1.1 client on asyncio streams and httptools' response parser, for the few
calls one server makes to another under `--role` (router -> prefill and decode servers, a
prefill server -> a decode server): one request per connection, a JSON body out, a JSON body or
a stream of events (`payload\\n\\n`, as the internal endpoints write them) back.

Why not a client library: none is a dependency (uvicorn and httptools are), and these calls need
only POST/GET on a loopback or LAN peer, no redirects, TLS, proxies or pooling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """The peer could not be reached, or closed the connection before the response ended."""


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL (the port defaults to 80)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://host:port, got {url!r}")
    return parts.hostname, parts.port or 80


class _Parsed:
    """httptools' callbacks: the body as it comes, and whether the message ended."""

    def __init__(self) -> None:
        self.headers_done = False
        self.complete = False
        self.body = bytearray()

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


class Response:
    """One response being read: `status` once open; then `events()` or `read()`; `close()`
    (idempotent) drops the connection, which the peer sees as the client leaving."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._parsed = _Parsed()
        self._parser = httptools.HttpResponseParser(self._parsed)
        self.status = 0

    @classmethod
    async def open(
        cls,
        url: str,
        method: str,
        path: str,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
        timeout: float = 5.0,
    ) -> Response:
        """Connect, send the request, read the response's head (within `timeout` seconds each).
        Raises UpstreamError."""
        host, port = split_url(url)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {url}: {e!r}") from None
        resp = cls(reader, writer)
        head = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}", "connection: close"]
        head += [f"{k}: {v}" for k, v in headers]
        if method == "POST":
            head += ["content-type: application/json", f"content-length: {len(body)}"]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await asyncio.wait_for(resp._fill(lambda: resp._parsed.headers_done), timeout)
        except asyncio.TimeoutError:
            resp.close()
            raise UpstreamError(f"{url} did not answer {path} in {timeout:g} s") from None
        except BaseException:
            resp.close()
            raise
        resp.status = resp._parser.get_status_code()
        return resp

    async def _fill(self, until) -> None:
        """Read and parse until `until()` or the message ends; UpstreamError if the connection
        ends first."""
        while not until() and not self._parsed.complete:
            try:
                data = await self._reader.read(65536)
            except OSError as e:
                raise UpstreamError(f"connection lost: {e!r}") from None
            if not data:
                raise UpstreamError("the peer closed the connection before the response ended")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                raise UpstreamError(f"bad response: {e}") from None

    async def read(self, timeout: float | None = None) -> bytes:
        """The whole body, within `timeout` seconds."""
        await self._bounded(self._fill(lambda: False), timeout, "finish its answer")
        return bytes(self._parsed.body)

    async def events(self, gap: float | None = None) -> AsyncIterator[bytes]:
        """Each event's payload as it arrives, until the response ends. UpstreamError when the
        peer sends nothing for `gap` seconds: it is hung, however long a stream that goes on
        sending lasts (only silence counts)."""
        body = self._parsed.body
        while True:
            end = body.find(b"\n\n")
            if end >= 0:
                event = bytes(body[:end])
                del body[: end + 2]
                yield event
            elif self._parsed.complete:
                return
            else:
                await self._bounded(self._fill(lambda: b"\n\n" in body), gap, "send anything")

    @staticmethod
    async def _bounded(fill, timeout: float | None, what: str) -> None:
        try:
            await asyncio.wait_for(fill, timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"it did not {what} in {timeout:g} s") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


async def request(
    url: str, method: str, path: str, body: bytes = b"", headers=(), timeout: float = 5.0
) -> tuple[int, bytes]:
    """(status, body) of one plain request, all within `timeout` seconds. Raises UpstreamError."""
    resp = await Response.open(url, method, path, body, headers, timeout)
    try:
        return resp.status, await resp.read(timeout)
    finally:
        resp.close()
