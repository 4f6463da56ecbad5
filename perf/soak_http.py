"""The soak's HTTP/1.1 client: one connection per request, raw asyncio streams, and a way to leave
at any point of an exchange (mid-body, right after the request, mid-stream; with a FIN or a RST).

Nothing here judges an answer; `soak_check.py` does. Standard library only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Leave:
    """Where the client goes away. `at`: "body" (after `cut` bytes of the body), "sent" (`wait`
    seconds after the whole request), or "stream" (after `events` SSE events); `rst` sends a TCP
    reset instead of a FIN."""

    at: str
    cut: int = 0
    wait: float = 0.0
    events: int = 1
    rst: bool = False


@dataclass
class Reply:
    """What came back. status 0: no response head. `whole`: the body arrived to its declared end
    (content-length, or the last chunk). `left`: the client left on purpose before that."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    whole: bool = False
    left: bool = False
    wire_error: str = ""  # how the exchange broke, when it did
    seconds: float = 0.0  # request start to the last byte (or to leaving)
    first_event_at: float | None = None  # perf_counter of the first SSE event


def request_bytes(method: str, path: str, host: str, body: bytes | None) -> tuple[bytes, bytes]:
    """(head, body) of one request; POST bodies say they are JSON."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body or b""


async def exchange(
    addr: tuple[str, int],
    method: str,
    path: str,
    body: bytes | None = None,
    leave: Leave | None = None,
    timeout: float = 60.0,
    on_event=None,
) -> Reply:
    """One request on a fresh connection. Never raises for the wire: a refused connection, a
    reset, a timeout are all a Reply with `wire_error`. `on_event(n)` sees each SSE event count."""
    t0 = time.perf_counter()
    reply = Reply()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
        head, data = request_bytes(method, path, f"{addr[0]}:{addr[1]}", body)
        if leave is not None and leave.at == "body":
            writer.write(head + data[: leave.cut])
            await writer.drain()
            reply.left = True
            return reply
        writer.write(head + data)
        await writer.drain()
        if leave is not None and leave.at == "sent":
            await asyncio.sleep(leave.wait)
            reply.left = True
            return reply
        await asyncio.wait_for(_read_reply(reader, reply, leave, on_event), timeout)
    except TimeoutError:
        reply.wire_error = f"no complete answer within {timeout:.0f}s"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        reply.wire_error = f"{type(e).__name__}: {e}"
    finally:
        reply.seconds = time.perf_counter() - t0
        if writer is not None:
            _close(writer, rst=leave is not None and leave.rst and reply.left)
    return reply


def _close(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST and drops unsent data
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _read_reply(reader: asyncio.StreamReader, reply: Reply, leave: Leave | None, on_event) -> None:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before a response head")
    reply.status = int(line.split(b" ", 2)[1])
    while (line := await reader.readline()) not in (b"\r\n", b"\n"):
        if not line:
            raise ConnectionError("closed inside the response head")
        name, _, value = line.decode("latin-1").partition(":")
        reply.headers[name.strip().lower()] = value.strip()
    body = bytearray()
    events = 0
    try:
        async for piece in _body_pieces(reader, reply.headers):
            new = (body[-1:] + piece).count(b"\n\n")  # every SSE event ends with a blank line
            body += piece
            if new and events == 0:
                reply.first_event_at = time.perf_counter()
            events += new
            if new and on_event is not None:
                on_event(events)
            if leave is not None and leave.at == "stream" and events >= leave.events:
                reply.left = True
                return
        reply.whole = True
    finally:
        reply.body = bytes(body)  # a partial body too, for the report


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("closed inside a chunked body (no last chunk)")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()  # the CRLF after the last chunk (no trailers here)
                return
            piece = await reader.readexactly(size)
            await reader.readexactly(2)
            yield piece
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


def sse_payloads(body: bytes) -> list[bytes]:
    """The payloads of the `data:` events of an SSE body, in order (a cut last event included)."""
    return [e[5:].strip() for e in body.split(b"\n\n") if e.startswith(b"data:")]
