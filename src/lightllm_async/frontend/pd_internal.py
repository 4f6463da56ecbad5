"""The internal endpoints of a `--role prefill|decode` server (pd_wire.py says what they carry),
which the router and the prefill servers call. They exist only on role servers, and answer only
a caller that sends the shared `--pd-secret` when the server has one.

The prefill server gives a handed-off request to the decode server itself, before it tells the
router: the decode engine receives a pair's transfers in order, so a transfer it never heard of
would hold back every later one; the router, which may die or leave at any moment, could lose
it, while the prefill server's frontend lives and dies with its engine, which made the transfer.
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
    ATTACH_PATH,
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
ATTACH_WAIT_S = 30.0  # a request handed over waits this long for the router's attach
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
    body = RoleInfo(ctx.pd_role, ctx.pd_rank, ctx.pd_world, alive, svc.max_model_len, svc.max_choices)
    await resp.json(body, 200 if alive else 503)


async def prefill(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    check_secret(svc, scope)
    if svc.ctx.pd_role != "prefill":
        raise ApiError(400, "This server is a decode server.")
    call = decode_body(_PREFILL, await read_body(receive))
    h = _started(lambda: svc.reader.submit(call.prompt_ids, call.params, call.decode_rank))
    svc.pd_calls[call.id] = h
    told = False

    async def hand_over() -> Event | None:
        """Before the handoff event: the decode server must have the request (it waits for the
        router's attach); an error event instead if it cannot be told."""
        nonlocal told
        told = True
        err = await _tell_decode(svc, call, h, abort=False)
        return None if err is None else Event(error=err)

    try:
        await _stream(h, receive, resp, hand_over)
    except ClientDisconnected:  # the router left (died, or gave up on us): abort; a handoff must
        svc.reader.abort(h)  # still be told, and one told already dropped (nobody will attach)
        h.disconnected = False  # so that wait() blocks again
        while h.finish_reason is None and not h.engine_dead:
            await h.wait()
        if h.handoff is not None:
            await (_drop_on_decode(svc, call) if told else _tell_decode(svc, call, h, abort=True))
    finally:
        del svc.pd_calls[call.id]


async def abort(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    """The router's client left (on a prefill server: abort; the stream goes on to its last
    event, a handoff too), or a request's prompt failed (on a decode server: drop what the prefill
    server may have handed over)."""
    check_secret(svc, scope)
    call = decode_body(_ABORT, await read_body(receive))
    h = svc.pd_calls.get(call.id)
    if svc.ctx.pd_role == "decode":  # handed over, not attached to: nobody will attach now
        h = svc.pd_calls.pop(call.id, None)
    if h is not None and h.finish_reason is None and not h.engine_dead:
        svc.reader.abort(h)
    await resp.json({})


async def decode(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    """From the prefill server: take the request over (answered once it is queued here); its
    output waits in its handle for the router's attach, ATTACH_WAIT_S at most, then it is aborted."""
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
    else:
        svc.pd_calls[call.id] = h
        loop.call_later(ATTACH_WAIT_S, _unclaimed, svc, call.id, h)
    await resp.json({})


def _unclaimed(svc: Service, call_id: str, h: RequestHandle) -> None:
    if svc.pd_calls.get(call_id) is h:
        log.warning("no router took request %s over in %g s: aborted", call_id, ATTACH_WAIT_S)
        del svc.pd_calls[call_id]
        svc.reader.abort(h)


async def attach(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    """The router: the output of a request the prefill server handed over, as a stream."""
    check_secret(svc, scope)
    call = decode_body(_ABORT, await read_body(receive))
    h = svc.pd_calls.pop(call.id, None) if svc.ctx.pd_role == "decode" else None
    if h is None:
        raise ApiError(404, f"No request {call.id!r} is waiting here (none came, or it waited too long).")
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


async def _stream(h: RequestHandle, receive: Receive, resp: Responder, hand_over=None) -> None:
    """The handle's news as Events until its last; ClientDisconnected when the caller left.
    `hand_over()` runs before a handoff event (an event it returns is sent instead)."""
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
                last = (await hand_over() if h.handoff is not None else None) or _last(h)
                if h.disconnected:  # the caller left while the decode server was told
                    raise ClientDisconnected
                await resp.event(ENCODER.encode(last))
                break
        await resp.end_stream()
    finally:
        watcher.cancel()


def _last(h: RequestHandle) -> Event:
    if h.handoff is not None:
        return Event(handoff=Handoff(*h.handoff))
    return Event(finish=int(h.finish_reason), cached_tokens=h.cached_tokens, queue_time=h.queue_time)


async def _tell_decode(svc: Service, call: PrefillCall, h: RequestHandle, abort: bool) -> str | None:
    """Give the handed-off request to the decode server (to drop at once, with `abort`); None
    once it has it, else what went wrong. Its engine receives the pair's transfers in order: one
    it never hears of holds back every later one, so this is the prefill server's to do (its
    engine and this frontend live and die together), not the router's (which may be gone)."""
    source, seq, cached, outputs = h.handoff
    body = ENCODER.encode(
        DecodeCall(call.prompt_ids, call.params, outputs, source, seq, cached, call.id, abort)
    )
    headers = secret_headers(svc.ctx.pd_secret)
    try:
        status, text = await upstream.request(
            call.decode_url, "POST", DECODE_PATH, body, headers, RESUME_WAIT_S + 5
        )
    except upstream.UpstreamError as e:
        status, text = 0, str(e).encode()
    if status == 200:
        return None
    log.error("decode server %s did not take transfer %d: %s %s", call.decode_url, seq, status, text[:200])
    return f"The decode server {call.decode_url} did not take the request over ({status}): {text[:200]!r}"


async def _drop_on_decode(svc: Service, call: PrefillCall) -> None:
    """The decode server has the handed-off request, but the router that would attach to it is
    gone: it drops the request now rather than after ATTACH_WAIT_S."""
    body = ENCODER.encode(AbortCall(call.id))
    try:
        await upstream.request(
            call.decode_url, "POST", ABORT_PATH, body, secret_headers(svc.ctx.pd_secret), RESUME_WAIT_S
        )
    except upstream.UpstreamError as e:  # it waits ATTACH_WAIT_S, then drops it itself
        log.warning("could not tell %s to drop request %s: %s", call.decode_url, call.id, e)


ROUTES = {
    INFO_PATH: {"GET": info},
    PREFILL_PATH: {"POST": prefill},
    ABORT_PATH: {"POST": abort},
    DECODE_PATH: {"POST": decode},
    ATTACH_PATH: {"POST": attach},
}
