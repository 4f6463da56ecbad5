"""The internal endpoints of a `--role prefill|decode` server, which only the router calls
(pd_wire.py says what they carry). They exist only on role servers, and answer only a caller
that sends the shared `--pd-secret` when the server has one.

A prefill server whose caller left before its engine handed the request off tells the decode
server itself (a DecodeCall with `abort`): the decode engine receives a pair's transfers in
order, so one it never heard of would hold back every later one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import msgspec

from . import upstream
from .asgi import ClientDisconnected, Receive, Responder, Scope, read_body
from .generation import watch_disconnect
from .pd_wire import (
    ABORT_PATH,
    DECODE_PATH,
    INFO_PATH,
    PREFILL_PATH,
    SECRET_HEADER,
    AbortCall,
    DecodeCall,
    Event,
    Handoff,
    Logprobs,
    PrefillCall,
    RoleInfo,
)
from .protocol import ENCODER, ApiError, decode_body, engine_dead_error
from .reader import EngineDead, RequestHandle
from .service import RETRY_AFTER, Service

log = logging.getLogger(__name__)

RESUME_WAIT_S = 30.0  # a decode server out of slots waits this long for one (the transfer waits too)
_PREFILL = msgspec.json.Decoder(PrefillCall)
_DECODE = msgspec.json.Decoder(DecodeCall)
_ABORT = msgspec.json.Decoder(AbortCall)


def check_secret(svc: Service, scope: Scope) -> None:
    """404 unless this is a role server; 403 unless the caller sent its --pd-secret (if any)."""
    if svc.ctx.pd_role not in ("prefill", "decode"):
        raise ApiError(404, f"Invalid URL ({scope['method']} {scope['path']}).")
    secret = svc.ctx.pd_secret
    if secret is None:
        return
    sent = next((v for k, v in scope["headers"] if k.lower() == SECRET_HEADER.encode()), b"")
    if not hmac.compare_digest(hashlib.sha256(sent).digest(), hashlib.sha256(secret.encode()).digest()):
        raise ApiError(403, "This internal endpoint needs the servers' --pd-secret.")


def secret_headers(secret: str | None) -> tuple[tuple[str, str], ...]:
    return () if secret is None else ((SECRET_HEADER, secret),)


async def info(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    check_secret(svc, scope)
    ctx, alive = svc.ctx, svc.engine_alive()
    await resp.json(RoleInfo(ctx.pd_role, ctx.pd_rank, ctx.pd_world, alive), 200 if alive else 503)


async def prefill(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    check_secret(svc, scope)
    if svc.ctx.pd_role != "prefill":
        raise ApiError(400, "This server is a decode server.")
    call = decode_body(_PREFILL, await read_body(receive))
    h = _started(lambda: svc.reader.submit(call.prompt_ids, call.params, call.decode_rank))
    svc.pd_calls[call.id] = h
    try:
        await _stream(h, receive, resp)
    except ClientDisconnected:
        await _orphaned(svc, h, call)
    finally:
        del svc.pd_calls[call.id]


async def abort(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    """The router's client left: abort; the stream goes on to its last event (a handoff too)."""
    check_secret(svc, scope)
    call = decode_body(_ABORT, await read_body(receive))
    h = svc.pd_calls.get(call.id)
    if h is not None and h.finish_reason is None and not h.engine_dead:
        svc.reader.abort(h)
    await resp.json({})


async def decode(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    check_secret(svc, scope)
    if svc.ctx.pd_role != "decode":
        raise ApiError(400, "This server is a prefill server.")
    call = decode_body(_DECODE, await read_body(receive))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESUME_WAIT_S

    def resume() -> RequestHandle | None:
        return svc.reader.resume(
            call.prompt_ids, call.params, call.output_ids, call.source, call.seq, call.cached_tokens
        )

    while (h := _started(resume, full_ok=loop.time() < deadline)) is None:
        await asyncio.sleep(0.01)
    if call.abort:
        svc.reader.abort(h)
        await resp.json({})
        return
    try:
        await _stream(h, receive, resp)
    except ClientDisconnected:
        svc.reader.abort(h)


def _started(start, full_ok: bool = False) -> RequestHandle | None:
    """start() with its failures as API errors; None (a full region) only when `full_ok`."""
    try:
        h = start()
    except EngineDead:
        raise engine_dead_error() from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if h is None and not full_ok:
        raise ApiError(503, "The server is at capacity (every request slot is in use).", headers=RETRY_AFTER)
    return h


async def _stream(h: RequestHandle, receive: Receive, resp: Responder) -> None:
    """The handle's news as Events until its last; ClientDisconnected when the caller left."""
    watcher = asyncio.create_task(watch_disconnect(receive, [h]))
    try:
        await resp.start_stream(done_marker=None, prefix=b"")
        while True:
            tokens = await h.wait()
            if h.disconnected:
                raise ClientDisconnected
            if h.engine_dead and h.finish_reason is None:
                await resp.event(ENCODER.encode(Event(error="The engine died; the server is stopping.")))
                break
            for c in h.take_logprobs():
                await resp.event(ENCODER.encode(Event(logprobs=Logprobs(*c))))
            if tokens:
                await resp.event(ENCODER.encode(Event(tokens=tokens)))
            if h.finish_reason is not None:
                await resp.event(ENCODER.encode(_last(h)))
                break
        await resp.end_stream()
    finally:
        watcher.cancel()


def _last(h: RequestHandle) -> Event:
    if h.handoff is not None:
        return Event(handoff=Handoff(*h.handoff))
    return Event(finish=int(h.finish_reason), cached_tokens=h.cached_tokens, queue_time=h.queue_time)


async def _orphaned(svc: Service, h: RequestHandle, call: PrefillCall) -> None:
    """The router left: abort; if the engine handed the request off all the same (the abort came
    too late), tell the decode server, so that it receives the transfer and drops it."""
    svc.reader.abort(h)
    h.disconnected = False  # so that wait() blocks again
    while h.finish_reason is None and not h.engine_dead:
        await h.wait()
    if h.handoff is None:
        return
    source, seq, cached, outputs = h.handoff
    body = ENCODER.encode(DecodeCall(call.prompt_ids, call.params, outputs, source, seq, cached, abort=True))
    try:
        status, text = await upstream.request(
            call.decode_url,
            "POST",
            DECODE_PATH,
            body,
            secret_headers(svc.ctx.pd_secret),
            timeout=RESUME_WAIT_S,
        )
    except upstream.UpstreamError as e:
        status, text = 0, str(e).encode()
    if status != 200:
        log.error("could not tell decode server %s of an abandoned transfer %d: %s %s",
                  call.decode_url, seq, status, text[:200])  # fmt: skip
    else:
        log.info("request abandoned during its handoff: decode server told to drop transfer %d", seq)


ROUTES = {
    INFO_PATH: {"GET": info},
    PREFILL_PATH: {"POST": prefill},
    ABORT_PATH: {"POST": abort},
    DECODE_PATH: {"POST": decode},
}
