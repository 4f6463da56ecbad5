"""`--role router`: the HTTP frontend of prefill and decode servers on other hosts.

It serves the whole API as a one-host frontend does (the same Service and Generation: the same
tokenization, detokenization, stop strings, usage), but its reader is remote: a request's
tokens come over HTTP from the prefill server that runs its prompt, then from the decode server
that takes it over, into the same RequestHandle a region's reader would fill. Per request:

1. pick the live prefill server P and decode server D with the fewest requests in flight (from
   this router);
2. POST /internal/pd/prefill to P naming D's group rank: P's engine runs the prompt, samples the
   first token (streamed at once), sends the KV to D's engine over torch.distributed and the
   stream ends with a `handoff` event (or a `finish`: the request ended on P);
   (P gives the request to D itself first: see frontend/pd_internal.py);
3. POST /internal/pd/attach to D: D's engine receives the KV in its transfer order and
   generates the rest, streamed on.

A client that leaves: on P, an abort call (P gives D a request its engine handed off all the
same, to drop); on D, the connection closes and D aborts the request. A server that dies ends
its requests with an error at once (its connection breaks); one that hangs (alive, but silent:
stopped, or its engine wedged) ends them the same way once it has sent nothing for the upstream
timeout (--pd-upstream-timeout: each of connecting, the response's head, and every gap between
events; a stream that goes on sending is never cut). Either way the router closes its
connections, which the role servers take as the router leaving (they abort the request), and
after a failure during the prompt asks D to drop whatever P gave it. New requests get 503 while
no prefill or no decode server answers its health check (polled every POLL_S, each within
CHECK_TIMEOUT_S), and are served again once one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from lightllm_async.types import FinishReason, SamplingParams

from . import upstream
from .pd_internal import secret_headers
from .pd_wire import (
    ABORT_PATH,
    ATTACH_PATH,
    EVENT_DECODER,
    INFO_PATH,
    PREFILL_PATH,
    AbortCall,
    Event,
    Handoff,
    PrefillCall,
    RoleInfo,
)
from .protocol import ENCODER
from .reader import EngineDead, LogprobChunk, RequestHandle

log = logging.getLogger(__name__)

POLL_S = 0.25  # health checks of every role server
CHECK_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 5.0  # at most, for connecting and for a response's head
UPSTREAM_TIMEOUT_S = 60.0  # --pd-upstream-timeout: above a prompt's queueing and prefill, and a
# prefill server's wait for a decode slot (pd_internal.RESUME_WAIT_S), which are silent


@dataclass
class RoleServer:
    """One prefill or decode server as the router sees it."""

    url: str
    role: str
    rank: int = -1  # its engine's rank in the PD group (from its info)
    alive: bool = False
    outstanding: int = 0  # requests of this router in its phase
    slots: int = 0  # its request slots (from its info): at most this many outstanding


class RemoteReader:
    """The router's reader: the interface of frontend/reader.Reader (submit, abort, start, stop,
    dead, num_replicas, num_active), over HTTP to the role servers."""

    def __init__(
        self,
        prefills: Sequence[str],
        decodes: Sequence[str],
        max_model_len: int,
        secret: str | None = None,
        timeout: float = UPSTREAM_TIMEOUT_S,
    ):
        self.max_model_len = max_model_len  # every role server's must be the same
        self._timeout = timeout  # a role server silent this long during a request is hung
        self._connect_timeout = min(CONNECT_TIMEOUT_S, timeout)
        self.servers = [RoleServer(u, "prefill") for u in prefills] + [
            RoleServer(u, "decode") for u in decodes
        ]
        self._headers = secret_headers(secret)
        self._tasks: dict[int, asyncio.Task] = {}  # by handle.slot (a request number here)
        self._phases: dict[int, str] = {}
        self._prefill_of: dict[int, RoleServer] = {}
        self._run_id = os.urandom(6).hex()  # call ids unique across routers and restarts
        self._ids = itertools.count()
        self._poller: asyncio.Task | None = None
        self.dead = False  # never: a router outlives its role servers
        self.num_replicas = 1

    # ------------------------------------------------------------ lifecycle and health

    async def start(self) -> None:
        await self._check_all()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        tasks = [t for t in (self._poller, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._poller = None

    @property
    def num_active(self) -> int:
        return len(self._tasks)

    def has_pair(self) -> bool:
        """Whether a live prefill and a live decode server answer."""
        return all(any(s.alive for s in self.servers if s.role == r) for r in ("prefill", "decode"))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self._check_all()

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(s) for s in self.servers))

    async def _check(self, s: RoleServer) -> None:
        alive, why = False, ""
        try:
            status, body = await upstream.request(
                s.url, "GET", INFO_PATH, headers=self._headers, timeout=CHECK_TIMEOUT_S
            )
            info = msgspec.json.decode(body, type=RoleInfo) if status in (200, 503) else None
            if info is None:
                why = f"status {status}: {body[:200]!r}"
            elif info.role != s.role:
                why = f"it is a {info.role} server, not a {s.role} server"
            elif info.max_model_len != self.max_model_len:  # a request that fits P must fit D
                why = f"its --max-model-len is {info.max_model_len}, this router's {self.max_model_len}"
            else:
                s.rank, alive, s.slots = info.rank, info.alive, info.num_slots
                why = "" if alive else "its engine is not running"
        except (upstream.UpstreamError, msgspec.MsgspecError) as e:
            why = str(e)
        if alive != s.alive:
            if alive:
                log.info("%s server %s (rank %d) is up", s.role, s.url, s.rank)
            else:
                log.warning("%s server %s is down: %s", s.role, s.url, why)
        s.alive = alive

    def _pick(self, role: str) -> RoleServer | None:
        """The live server of `role` with the fewest requests in flight and a slot free."""
        live = [s for s in self.servers if s.role == role and s.alive and s.outstanding < s.slots]
        return min(live, key=lambda s: s.outstanding, default=None)

    # ------------------------------------------------------------ requests

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle | None:
        """Start a request on the least loaded live pair with room; None when every live one is
        full (a decode server out of slots could not take a handoff over), EngineDead when no
        prefill or no decode server is up."""
        for role in ("prefill", "decode"):
            if not any(s.alive for s in self.servers if s.role == role):
                raise EngineDead(f"No {role} server is up; this router cannot serve requests until one is.")
        p, d = self._pick("prefill"), self._pick("decode")
        if p is None or d is None:
            return None
        first = params.first_logprob_position(len(prompt_ids)) if params.wants_logprobs else -1
        h = RequestHandle(next(self._ids), 0, params.top_logprobs, first, replica=p.rank)
        h.source, h.decode = p.rank, d.rank
        self._tasks[h.slot] = asyncio.create_task(self._run(h, list(prompt_ids), params, p, d))
        return h

    def _call_id(self, h: RequestHandle) -> str:
        """The request's name on the role servers (`slot` is a request number here)."""
        return f"{self._run_id}-{h.slot}"

    def abort(self, h: RequestHandle) -> None:
        """The client left. On the decode server: close the connection (it aborts the request).
        On the prefill server: an abort call, its stream read on to its end (a handoff that
        comes all the same is attached to and closed, which aborts it on D at once rather than
        when nobody attached in time)."""
        h._abandon()
        phase, task = self._phases.get(h.slot), self._tasks.get(h.slot)
        if phase == "decode":
            task.cancel()
        elif phase == "prefill":
            self._abort_on(self._prefill_of[h.slot], h)

    def _abort_on(self, s: RoleServer, h: RequestHandle) -> None:
        """Ask `s` to drop its half of the request, in the background."""
        body = ENCODER.encode(AbortCall(self._call_id(h)))
        asyncio.create_task(self._abort_call(s, body))

    async def _abort_call(self, s: RoleServer, body: bytes) -> None:
        try:
            await upstream.request(s.url, "POST", ABORT_PATH, body, self._headers, self._connect_timeout)
        except upstream.UpstreamError as e:  # dead or hung: the request ends with its stream
            log.info("abort call to %s failed: %s", s.url, e)

    async def _run(
        self, h: RequestHandle, prompt: list[int], params: SamplingParams, p: RoleServer, d: RoleServer
    ) -> None:
        server = p
        p.outstanding += 1
        d.outstanding += 1
        self._prefill_of[h.slot] = p
        try:
            self._phases[h.slot] = "prefill"
            call = PrefillCall(prompt, params, d.rank, d.url, self._call_id(h))
            handoff = await self._prefill(h, call, p)
            p.outstanding -= 1
            server = d
            if handoff is not None:
                await self._decode(h, d)
        except upstream.UpstreamError as e:
            _fail(h, f"The {server.role} server {server.url} failed during this request: {e}. Retry shortly.")
            if server is p:  # P may have given D the request before it failed: D drops it
                self._abort_on(d, h)
        except asyncio.CancelledError:
            pass
        finally:
            if server is p:
                p.outstanding -= 1
            d.outstanding -= 1
            del self._tasks[h.slot], self._phases[h.slot], self._prefill_of[h.slot]

    async def _prefill(self, h: RequestHandle, call: PrefillCall, p: RoleServer) -> Handoff | None:
        resp = await upstream.Response.open(
            p.url, "POST", PREFILL_PATH, ENCODER.encode(call), self._headers, self._connect_timeout
        )
        try:
            if await _refused(h, resp, p, self._timeout):
                return None
            async for raw in resp.events(self._timeout):
                ev = EVENT_DECODER.decode(raw)
                if ev.handoff is not None:
                    return ev.handoff
                if _apply(h, ev, p):
                    return None
            raise upstream.UpstreamError("its stream ended before the request did")
        finally:
            resp.close()

    async def _decode(self, h: RequestHandle, d: RoleServer) -> None:
        """Stream D's tokens of the request P gave it."""
        self._phases[h.slot] = "decode"
        h.replica = d.rank
        body = ENCODER.encode(AbortCall(self._call_id(h)))
        resp = await upstream.Response.open(
            d.url, "POST", ATTACH_PATH, body, self._headers, self._connect_timeout
        )
        try:
            if h.abandoned or await _refused(h, resp, d, self._timeout):
                return
            async for raw in resp.events(self._timeout):
                if _apply(h, EVENT_DECODER.decode(raw), d):
                    return
            raise upstream.UpstreamError("its stream ended before the request did")
        finally:
            resp.close()


def _apply(h: RequestHandle, ev: Event, server: RoleServer) -> bool:
    """Deliver one event to the handle; True if it was the last."""
    if ev.logprobs is not None:
        h._deliver_logprobs(LogprobChunk(*msgspec.structs.astuple(ev.logprobs)))
    if ev.tokens:
        h._deliver(ev.tokens)
    if ev.error is not None:
        _fail(h, f"The {server.role} server {server.url} failed this request: {ev.error}")
        return True
    if ev.finish >= 0:
        if ev.finish == FinishReason.ERROR:
            h.error = f"The {server.role} server {server.url} failed this request" + (
                f": it could not receive its KV from the prefill server (group rank {h.source}); the "
                "transfer failed or timed out."
                if server.role == "decode"
                else "."
            )
        h.queue_time = ev.queue_time
        h._finish(FinishReason(ev.finish), ev.cached_tokens)
        return True
    return False


async def _refused(h: RequestHandle, resp: upstream.Response, server: RoleServer, timeout: float) -> bool:
    """A role server that answered with an error: the request ends with it."""
    if resp.status == 200:
        return False
    body = await resp.read(timeout)
    try:
        message = msgspec.json.decode(body)["error"]["message"]
    except Exception:  # noqa: BLE001 - any body: show its start
        message = body[:200].decode(errors="replace")
    _fail(h, f"The {server.role} server {server.url} refused this request ({resp.status}): {message}")
    return True


def _fail(h: RequestHandle, message: str) -> None:
    h.error = message
    h._fail()
