"""The few ASGI pieces the app needs: read a body, send JSON, send an SSE stream, send errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .limits import MAX_BODY_BYTES
from .protocol import ENCODER, ApiError, error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientDisconnected(Exception):
    """The client went away; the request was aborted and nothing more can be sent."""


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def body_too_large(limit: int = MAX_BODY_BYTES) -> ApiError:
    return ApiError(413, f"Request body is larger than the limit of {limit} bytes.")


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


class Responder:
    """Sends one response: a JSON body, or an SSE stream of events; knows what was sent already.

    A failing send means the client went away: it raises ClientDisconnected. `headers` go on
    every response it starts (CORS).
    """

    def __init__(self, send: Send, headers: tuple[tuple[bytes, bytes], ...] = ()):
        self._send = send
        self._headers = headers
        self.started = False
        self.ended = False
        self.status = 0  # the status sent, once a response started
        self._sse_done: bytes | None = None  # the stream's end marker, once SSE started
        self._prefix = b"data: "

    async def _emit(self, msg: Message) -> None:
        try:
            await self._send(msg)
        except ClientDisconnected:
            raise
        except Exception as e:  # servers raise OSError or their own ClientDisconnected
            raise ClientDisconnected from e

    async def body(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.started = self.ended = True
        self.status = status
        await self._emit(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                    *self._headers,
                ],
            }
        )
        await self._emit({"type": "http.response.body", "body": body})

    async def json(self, obj: Any, status: int = 200) -> None:
        await self.body(status, ENCODER.encode(obj))

    async def error(self, err: ApiError) -> None:
        """The error as a JSON response, or as a last SSE event if the stream already started."""
        payload = ENCODER.encode(error_body(err))
        if self.ended:
            return
        if self._sse_done is not None:
            await self.event(payload)
            await self.end_stream()
        elif not self.started:
            await self.body(err.status, payload, headers=err.headers)

    async def start_stream(
        self, done_marker: bytes | None = b"data: [DONE]\n\n", prefix: bytes = b"data: "
    ) -> None:
        """Start an SSE response; `prefix` begins every event (LightLLM writes `data:`)."""
        self.started = True
        self.status = 200
        self._sse_done = done_marker or b""
        self._prefix = prefix
        headers = [*_SSE_HEADERS, *self._headers] if self._headers else _SSE_HEADERS
        await self._emit({"type": "http.response.start", "status": 200, "headers": headers})

    async def event(self, payload: bytes) -> None:
        await self._emit(
            {"type": "http.response.body", "body": self._prefix + payload + b"\n\n", "more_body": True}
        )

    async def end_stream(self) -> None:
        self.ended = True
        await self._emit({"type": "http.response.body", "body": self._sse_done or b""})
