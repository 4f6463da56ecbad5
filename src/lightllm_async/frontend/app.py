"""The ASGI application: routing, lifespan, and the error boundary around every handler.

Run it under uvicorn with `loop="uvloop", http="httptools", lifespan="on"`; lifespan startup
starts the reader (it also starts lazily on the first request if lifespan is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from . import native_api, openai_api, openapi, pd_internal, tokenize_api
from .asgi import ClientDisconnected, Receive, Responder, Scope, Send
from .auth import OPEN_PATHS, ApiKey
from .context import FrontendContext
from .edge import Edge, check_json_body
from .metrics import Metrics
from .protocol import ENCODER, ApiError, engine_dead_error
from .service import Service, shutting_down_error

__all__ = ["FrontendContext", "create_app"]

log = logging.getLogger(__name__)


async def health(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    if not svc.engine_alive():
        raise engine_dead_error()
    await resp.body(200, b"{}")


async def openapi_json(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    await resp.body(200, _openapi_body(svc.ctx.api_key is not None))


_ROUTES = {
    "/v1/chat/completions": {"POST": openai_api.chat_completions},
    "/v1/completions": {"POST": openai_api.completions},
    "/v1/models": {"GET": openai_api.list_models},
    "/generate": {"POST": native_api.generate},
    "/generate_stream": {"POST": native_api.generate_stream},
    "/tokenize": {"POST": tokenize_api.tokenize},
    "/detokenize": {"POST": tokenize_api.detokenize},
    "/health": {"GET": health},
    "/openapi.json": {"GET": openapi_json},
}


def served_routes() -> dict[str, tuple[str, ...]]:
    """Every path the app answers and its methods: the table above and /metrics (served before
    the table, so that it stays up while the server drains)."""
    return {**{path: tuple(methods) for path, methods in _ROUTES.items()}, "/metrics": ("GET",)}


@functools.cache
def _openapi_body(secured: bool) -> bytes:
    return ENCODER.encode(openapi.document(served_routes(), secured=secured, open_paths=OPEN_PATHS))


END_GRACE_S = 2.0  # after a drain's deadline: time for the ended requests to send their errors


class App:
    """A plain ASGI 3 callable serving one `Service`; `drain` ends it gracefully."""

    def __init__(self, ctx: FrontendContext):
        self.service = Service(ctx)
        self.metrics = Metrics(self.service)
        self.edge = Edge(ctx.edge)
        self.api_key = ApiKey(ctx.api_key) if ctx.api_key is not None else None
        self._started = False
        self.draining = False
        self.in_flight = 0  # requests admitted and not yet answered
        # --role prefill|decode: the router's internal endpoints (they check --pd-secret, not the key)
        self._internal = pd_internal.ROUTES if ctx.pd_role in ("prefill", "decode") else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self.service.reader.start()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as e:
                    log.exception("frontend startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._started:
                    await self.service.reader.stop()
                    self._started = False
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = Responder(send)
        method, path = scope["method"], scope["path"]
        admitted = False
        try:
            cors = self.edge.check(scope)
            resp = Responder(send, cors)
            if (headers := self.edge.preflight(scope, cors)) is not None:
                await resp.body(204, b"", headers=headers)
                return
            if path == "/metrics" and method == "GET":
                await self.metrics.handle(scope, receive, resp)
                return
            if self.draining:
                raise shutting_down_error()
            internal = self._internal.get(path)
            if self.api_key is not None and path not in OPEN_PATHS and internal is None:
                self.api_key.check(scope["headers"])
            methods = _ROUTES.get(path, internal)
            if methods is None:
                raise ApiError(404, f"Invalid URL ({method} {path}).")
            handler = methods.get(method)
            if handler is None:
                allow = ", ".join(methods).encode()
                raise ApiError(
                    405, f"Method {method} is not allowed for {path}.", headers=((b"allow", allow),)
                )
            if method == "POST":
                check_json_body(scope)
            admitted = True
            self.in_flight += 1
            await self._start()
            await handler(self.service, scope, receive, resp)
        except ClientDisconnected:
            pass
        except ApiError as e:
            await self._answer(resp, e)
        except Exception:
            log.exception("internal error while serving %s %s", method, path)
            await self._answer(resp, ApiError(500, "Internal server error."))
        finally:
            self.in_flight -= admitted
            self.metrics.count(path if path in _ROUTES or path == "/metrics" else "other", resp.status)

    @staticmethod
    async def _answer(resp: Responder, err: ApiError) -> None:
        with contextlib.suppress(ClientDisconnected):
            await resp.error(err)

    async def drain(
        self, timeout: float, hurry: Callable[[], bool] = lambda: False, err: ApiError | None = None
    ) -> int:
        """Answer new requests with 503, let those in flight finish for up to `timeout` seconds
        (less once `hurry()` is true), then end the rest with `err` (default: a 503 "shutting
        down"; an error event and the end marker on a stream). Returns how many were still in
        flight after all that."""
        self.draining = True
        loop = asyncio.get_running_loop()
        if self.in_flight:
            log.info("draining %d requests in flight (up to %g s); new ones get 503", self.in_flight, timeout)
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline and not hurry():
            await asyncio.sleep(0.02)
        if self.in_flight:
            n = self.service.end_all(err or shutting_down_error())
            log.warning("shutdown timeout: ending %d requests in flight (%d generating)", self.in_flight, n)
            deadline = loop.time() + END_GRACE_S
            while self.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.02)
        return self.in_flight


def create_app(ctx: FrontendContext) -> App:
    """The ASGI app for `ctx`; one per process (it owns the region's frontend side)."""
    return App(ctx)
