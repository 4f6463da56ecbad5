"""uvicorn with the edge's bounds on clients, and a graceful drain on SIGTERM and SIGINT.

uvicorn's httptools protocol bounds neither the time a client may take to send a request nor the
size of its head, and answers what it refuses in plain text. `GuardedProtocol` adds:

- a read timeout: a request's head and body must arrive within `read_timeout` seconds of its
  first byte (of the connection, for the first request); a client that stalls gets 408 and is
  disconnected. Between requests uvicorn's keep-alive timeout closes idle connections.
- head limits (limits.MAX_HEADERS, limits.MAX_HEADER_BYTES): 431.
- a connection cap: beyond `max_connections` open connections, a new one is answered 503 and
  closed.

Every refusal is an OpenAI error object. `DrainingServer` turns the first SIGTERM or SIGINT into
`App.drain` (new requests get 503, those in flight finish or are ended at `shutdown_timeout`)
and only then lets uvicorn stop; a second signal ends the requests in flight at once. Its `Hooks`
tell the server process when uvicorn listens, tick every 0.1 s on the event loop, and tell when
the drain starts (systemd's READY=1, WATCHDOG=1 and STOPPING=1). `engine_died` (from any
thread) drains the same way with a short deadline: the requests on the engines still running
go on for that long, then end with an error, and uvicorn stops.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import App
from .limits import KEEP_ALIVE_TIMEOUT_S, MAX_HEADER_BYTES, MAX_HEADERS
from .protocol import ENCODER, ApiError, error_body
from .service import stopping_after_death_error

LINGER_S = 2.0  # a refused connection is closed after this long, or once the client closes it
_STATUS_LINES = {
    400: b"400 Bad Request",
    408: b"408 Request Timeout",
    431: b"431 Request Header Fields Too Large",
}


@dataclass(frozen=True)
class ClientLimits:
    """How long a client may take to send a request, and how many may be connected at once."""

    read_timeout: float = 30.0
    max_connections: int = 1000  # 0: no cap


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; uvicorn then calls send_400_response."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read timeout, head limits and a connection cap."""

    def __init__(self, *args, limits: ClientLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # the bytes arriving now belong to a request's head
        self._head_bytes = 0  # bytes received since the head began (it may not be parsed yet)
        self._head_size = 0  # the parsed request line and headers
        self._num_headers = 0
        self._refusal: ApiError | None = None
        self._closing = False

    # -- uvicorn's protocol callbacks, each extended

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self._limits.max_connections
        if cap and len(self.connections) > cap:
            self.app = _over_capacity  # this connection's request is answered 503, then it closes
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # refused: what still arrives is dropped until the connection closes
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEADER_BYTES and not self._closing:
            self._refuse(self._head_too_large())  # a head still arriving: refused at the bound

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._num_headers = self._head_size = 0
        if self._timer is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        self._head_size += len(name) + len(value) + 4
        if self._num_headers > MAX_HEADERS:
            self._refuse_in_parser(ApiError(431, f"The request has more than {MAX_HEADERS} headers."))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size > MAX_HEADER_BYTES:  # a head that arrived whole in one read
            self._refuse_in_parser(self._head_too_large())
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_head, self._head_bytes = True, 0

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as an error object."""
        self._refuse(self._refusal or ApiError(400, msg))

    # -- ours

    @staticmethod
    def _head_too_large() -> ApiError:
        return ApiError(431, f"The request head is larger than {MAX_HEADER_BYTES} bytes.")

    def _refuse_in_parser(self, err: ApiError) -> None:
        self._refusal = err
        raise _Refused

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self._limits.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing or self.transport.is_closing() or (self._in_head and not self._can_answer()):
            return  # a pipelined head waits behind a response; the keep-alive timeout follows it
        what, limit = "headers" if self._in_head else "body", self._limits.read_timeout
        self._refuse(ApiError(408, f"The request {what} did not arrive within {limit:g} s."))

    def _can_answer(self) -> bool:
        """Whether a response written now is the answer to the request being read: no response
        is on the wire or due before it (pipelining), and none was given to it yet."""
        if self.pipeline:
            return False
        cycle = self.cycle  # in a head, the previous request's; in a body, this one's
        if cycle is None:
            return True
        return cycle.response_complete if self._in_head else not cycle.response_started

    def _refuse(self, err: ApiError) -> None:
        """Answer `err` if this request can still be answered, and close the connection.

        The close lingers: closing with unread input would reset the connection, and the client
        would lose the answer. So what still arrives is read and dropped, until the client
        closes its side or LINGER_S pass."""
        if self._can_answer():
            body = ENCODER.encode(error_body(err))
            head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
                _STATUS_LINES[err.status],
                len(body),
            )
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
        self._closing = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # its handler stops; it sends nothing more
            self.cycle.message_event.set()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


async def _over_capacity(scope, receive, send) -> None:
    err = ApiError(503, "The server has too many open connections (--max-connections); retry shortly.")
    body = ENCODER.encode(error_body(err))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """What the server process is told, on the event loop: `serving` once uvicorn listens, `tick`
    every 0.1 s from then on (also while draining), `draining` when a signal starts the drain."""

    serving: Callable[[], None] = _nothing
    tick: Callable[[], None] = _nothing
    draining: Callable[[], None] = _nothing


class DrainingServer(uvicorn.Server):
    """uvicorn's Server; a signal drains `app` first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: App, shutdown_timeout: float, hooks: Hooks = Hooks()):
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._hooks = hooks
        self._drain: asyncio.Task | None = None
        self._serving = False
        self.signals = 0
        self._death_grace: float | None = None  # set by engine_died

    def engine_died(self, grace: float) -> None:
        """An engine process died (called from the server's watcher thread): stop serving. The
        requests in flight on the other engine replicas may go on for `grace` seconds, then end
        with an error (those of the dead one have ended already: the reader saw it)."""
        self._death_grace = grace

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it would stop at once and raise the signal again after serving.
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        # uvicorn ticks from the end of its startup on: the first tick means it listens.
        if not self._serving:
            self._serving = True
            self._hooks.serving()
        self._hooks.tick()
        if self._drain is None and self._death_grace is not None:
            self._drain = asyncio.create_task(
                self._app.drain(
                    self._death_grace, hurry=lambda: self.signals > 0, err=stopping_after_death_error()
                )
            )
        if self.signals and self._drain is None:
            self._hooks.draining()
            self._drain = asyncio.create_task(
                self._app.drain(self._shutdown_timeout, hurry=lambda: self.signals > 1)
            )
        if self._drain is not None and self._drain.done():
            self._close_stuck_connections()
            self.should_exit = True
        return await super().on_tick(counter)

    def _close_stuck_connections(self) -> None:
        """Close what uvicorn's shutdown would wait for: responses still being written after the
        drain (a client that stopped reading) and refused connections lingering."""
        for conn in list(self.server_state.connections):
            cycle = getattr(conn, "cycle", None)
            if getattr(conn, "_closing", False) or (cycle is not None and not cycle.response_complete):
                conn.transport.abort()


def build_server(
    app: App,
    host: str,
    port: int,
    log_level: str,
    limits: ClientLimits,
    shutdown_timeout: float,
    hooks: Hooks = Hooks(),
) -> DrainingServer:
    """The uvicorn server for `app` (uvloop, httptools, lifespan on)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=functools.partial(GuardedProtocol, limits=limits),  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        timeout_graceful_shutdown=2,  # after the drain, only idle connections are left
    )
    return DrainingServer(config, app, shutdown_timeout, hooks)
