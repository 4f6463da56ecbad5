"""The one reader per process: engine wake-ups → per-request token buffers on the event loop.

A helper thread (the region's wake relay: native, so it never takes the GIL) blocks on the frontend
semaphore and turns each post into a write to an eventfd that the event loop watches. On each
wake-up the loop reads every active slot's state and output count in one call, copies the new
tokens of the slots that have some into their `RequestHandle`s, and wakes the handlers awaiting
them. Handlers never touch the region's output side and never poll.

The reader also owns slot lifetime: a slot goes back to the free list only after the engine has
marked it FINISHED and the last tokens were copied, whether the handler still listens or has
aborted (an abort is a flag the engine acknowledges by finishing the slot with ABORT).

With several engine replicas (--dp), the reader picks the replica of each request
(balance.LeastOutstanding) and reads every slot the same way whichever replica runs it. When a
replica dies, its requests end with an error at once; the others' go on (the server stops soon
after), and new requests are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from lightllm_async.ipc import FrontendRegion, SlotState
from lightllm_async.types import FinishReason, SamplingParams

from .balance import LeastOutstanding

log = logging.getLogger(__name__)

LIVENESS_INTERVAL_S = 0.1  # engine_alive() checks; the server gives in-flight requests 1 s
_RUNNING, _FINISHED, _HANDOFF = int(SlotState.RUNNING), int(SlotState.FINISHED), int(SlotState.HANDOFF)
# RUNNING, FINISHED and HANDOFF (--pd) are the states where the output count means something
assert _FINISHED == _RUNNING + 1 and _HANDOFF == _FINISHED + 1
assert all(s < _RUNNING for s in SlotState if s not in (_RUNNING, _FINISHED, _HANDOFF))
_FEW = 8  # up to this many active requests, a wake-up reads them one by one


class EngineDead(Exception):
    """An engine process is gone; the requests in flight on it cannot finish."""


class LogprobChunk(NamedTuple):
    """Log-probabilities of positions start, start + 1, ...: each token's own, and the top k
    tokens' ids and log-probabilities (lists of lists)."""

    start: int
    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class RequestHandle:
    """One request's output as the reader delivers it. Used on the event loop only."""

    __slots__ = (
        "slot",
        "gen",
        "replica",
        "source",
        "decode",
        "handoff",
        "_tokens",
        "finish_reason",
        "cached_tokens",
        "queue_time",
        "engine_dead",
        "error",
        "disconnected",
        "abandoned",
        "_event",
        "logprob_k",
        "logprob_next",
        "_logprobs",
    )

    def __init__(self, slot: int, gen: int, logprob_k: int = 0, logprob_first: int = -1, replica: int = 0):
        self.slot = slot
        self.gen = gen
        self.replica = replica  # the engine replica that runs it
        # --pd: the prefill replica that computes its prompt and the decode replica it goes to
        # (-1: none); `replica` is the first until the handoff is relayed, then the second
        self.source = self.decode = -1
        # --role prefill: (source rank, transfer number, cached_tokens, output ids) once the engine
        # handed it off to another server's decode engine (it then finishes with FinishReason.NONE)
        self.handoff: tuple[int, int, int, list[int]] | None = None
        self._tokens: list[int] = []  # copied but not yet taken by the handler
        # log-probabilities: top tokens per position, and the next position to copy (-1: none)
        self.logprob_k = logprob_k
        self.logprob_next = logprob_first
        self._logprobs: list[LogprobChunk] = []
        self.finish_reason: FinishReason | None = None  # set once the engine finished the slot
        self.cached_tokens = 0
        self.queue_time: float | None = None  # submit to first admission, once finished
        self.engine_dead = False
        self.error: str | None = None  # with engine_dead, what the client is told (else a default)
        self.disconnected = False  # set by the handler's disconnect watcher
        self.abandoned = False  # the handler stopped reading; drop tokens, free on finish
        self._event = asyncio.Event()

    async def wait(self) -> list[int]:
        """Wait for news (tokens, finish, death, disconnect); return the new tokens. Look at
        finish_reason right after it returns, with no await in between (not through wait_for,
        which runs it as another task): a finish seen then came with every token."""
        if not (self._tokens or self.finish_reason is not None or self.engine_dead or self.disconnected):
            await self._event.wait()
        self._event.clear()
        tokens, self._tokens = self._tokens, []
        return tokens

    def take_logprobs(self) -> list[LogprobChunk]:
        """The log-probabilities copied since the last call (each token's arrive with it or
        before it; a prompt's, before the first output token)."""
        chunks, self._logprobs = self._logprobs, []
        return chunks

    def notify_disconnect(self) -> None:
        self.disconnected = True
        self._event.set()

    # The reader's side: news about the slot.

    def _deliver(self, tokens: list[int]) -> None:
        if not self.abandoned:
            self._tokens.extend(tokens)
            self._event.set()

    def _deliver_logprobs(self, chunk: LogprobChunk) -> None:
        if not self.abandoned:
            self._logprobs.append(chunk)
            self._event.set()

    def _finish(self, reason: FinishReason, cached_tokens: int) -> None:
        self.finish_reason = reason
        self.cached_tokens = cached_tokens
        self._event.set()

    def _fail(self) -> None:
        self.engine_dead = True
        self._event.set()

    def _abandon(self) -> None:
        self.abandoned = True
        self._tokens = []


class Reader:
    """Owns the frontend side of the region's output: submit, read, abort, free.

    `replicas_alive()` says, by replica, whether each engine replica still runs (None: one
    replica, whose liveness is `engine_alive()`); it is called ten times a second on the loop.
    """

    def __init__(
        self,
        region: FrontendRegion,
        engine_alive: Callable[[], bool],
        replicas_alive: Callable[[], Sequence[bool]] | None = None,
        pd_prefill: int = 0,
    ):
        self._region = region
        self._replicas_alive = replicas_alive or (lambda: (engine_alive(),))
        self.num_replicas = region.num_replicas
        # one replica: every request goes to it, with no bookkeeping on the way
        self._chooser = LeastOutstanding(self.num_replicas) if self.num_replicas > 1 else None
        # --pd: replicas [0, pd_prefill) prefill, the rest decode; each kind has its chooser
        self._pd = pd_prefill
        self._handing: dict[int, RequestHandle] = {}  # by slot: on their prefill replica still
        if pd_prefill:
            self._chooser = None
            self._prefills = LeastOutstanding(pd_prefill)
            self._decodes = LeastOutstanding(self.num_replicas - pd_prefill)
        self._dead_replicas: set[int] = set()
        n = region.spec.num_slots
        self._active: dict[int, RequestHandle] = {}
        # The same, by slot: a table and a mask, so that a change costs O(1) and a wake-up finds
        # the active slots with one numpy call (`_slots`, recomputed after a change).
        self._by_slot: list[RequestHandle | None] = [None] * n
        self._mask = np.zeros(n, bool)
        self._slots: np.ndarray | None = None
        self._num_read = np.zeros(n, np.int64)  # output tokens copied, by slot
        self._logprob_handles: dict[int, RequestHandle] = {}  # the active ones with log-probabilities
        self._loop: asyncio.AbstractEventLoop | None = None
        self._efd = -1
        self._relay: Any = None
        self._liveness: asyncio.Task | None = None
        self.dead = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop.add_reader(self._efd, self._on_eventfd)
        self._relay = self._region.start_wake_relay(self._efd)
        self._region.set_frontend_busy(False)  # a reader before us may have left it set
        self._liveness = asyncio.create_task(self._watch_engine())

    async def stop(self) -> None:
        """Stop listening. The relay is joined here: the server closes the region after us."""
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None
        if self._relay is not None:
            self._region.stop_wake_relay(self._relay)
            self._relay = None
            self._region.set_frontend_busy(False)
        if self._efd >= 0:
            self._loop.remove_reader(self._efd)
            os.close(self._efd)
            self._efd = -1

    @property
    def num_active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------ requests

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, handoff_to: int = -1
    ) -> RequestHandle | None:
        """Start a request on the least loaded replica; None when every slot is taken. Raises
        EngineDead once any replica died (the server is stopping). `handoff_to` (--role prefill):
        the group rank of another server's decode engine that the engine hands it off to; the
        handle then finishes with FinishReason.NONE and `handoff` set once it did."""
        if self.dead:
            raise EngineDead
        chooser = self._chooser
        replica = 0 if chooser is None else chooser.pick()
        decode = handoff_to
        if self._pd:
            replica, decode = self._prefills.pick(), self._pd + self._decodes.pick()
        got = self._region.start_request(prompt_ids, params, replica, decode)
        if got is None:
            return None
        handle = self._follow(*got, prompt_ids, params, replica)
        if self._pd:
            handle.source, handle.decode = replica, decode
            self._prefills.started(replica)
            self._decodes.started(decode - self._pd)
        if decode >= 0:
            self._handing[handle.slot] = handle
        return handle

    def resume(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        output_ids: Sequence[int],
        source: int,
        seq: int,
        cached_tokens: int,
    ) -> RequestHandle | None:
        """--role decode: take over a request another server's prefill engine (group rank
        `source`) handed off as its transfer `seq`; the handle delivers the tokens after
        `output_ids`. None when every slot is taken; ValueError when it cannot fit a slot."""
        if self.dead:
            raise EngineDead
        got = self._region.start_resumed(prompt_ids, params, output_ids, source, seq, cached_tokens)
        if got is None:
            return None
        handle = self._follow(*got, prompt_ids, params, 0, len(prompt_ids) + len(output_ids))
        self._num_read[handle.slot] = len(output_ids)
        return handle

    def _follow(
        self,
        slot: int,
        gen: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        replica: int,
        first_logprob: int = -1,
    ) -> RequestHandle:
        """A handle for a slot just queued, read from the next wake-up on."""
        chooser = self._chooser
        if chooser is not None:
            chooser.started(replica)
        if params.wants_logprobs:
            if first_logprob < 0:
                first_logprob = params.first_logprob_position(len(prompt_ids))
            handle = RequestHandle(slot, gen, params.top_logprobs, first_logprob, replica)
            self._logprob_handles[slot] = handle
        else:
            handle = RequestHandle(slot, gen, replica=replica)
        self._num_read[slot] = 0
        self._active[slot] = self._by_slot[slot] = handle  # before any wake-up: we are on the loop
        self._mask[slot] = True
        self._slots = None
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request the handler no longer reads; its slot is freed when the engine agrees."""
        handle._abandon()
        if handle.finish_reason is None and not handle.engine_dead:
            self._region.abort(handle.slot, handle.gen)

    # ------------------------------------------------------------ wake-ups

    def _on_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)  # reset before reading the slots, so a later post wakes us
        # While we read, the engine need not post (each post costs it a syscall and us a wake-up);
        # a second pass reads what it published before it could see the flag cleared.
        seq = self._region.set_frontend_busy(True)
        self._on_wake()
        if self._region.set_frontend_busy(False) != seq:
            self._on_wake()

    def _on_wake(self) -> None:
        """Copy what every active slot published since the last wake-up; end the finished ones."""
        if self._handing:
            self._relay_handoffs()
        self._on_wake_tokens()
        # Log-probabilities published without a token (a prompt's): copied now, so that the
        # engine, which may run only so far ahead of this reader, goes on.
        for h in list(self._logprob_handles.values()):
            state, _, _ = self._region.poll_output(h.slot)
            if state >= _RUNNING:  # the slot's logprob_end is this request's
                self._take_logprobs(h)

    def _on_wake_tokens(self) -> None:
        if len(self._active) <= _FEW:  # numpy's per-call cost outweighs its loop here
            for h in list(self._active.values()):
                state, _, n = self._region.poll_output(h.slot)
                if state == _FINISHED or (state >= _RUNNING and n != self._num_read[h.slot]):
                    self._take(h, n, state == _FINISHED)
            return
        if self._slots is None:
            self._slots = np.flatnonzero(self._mask)
        slots = self._slots
        states, _, counts = self._region.poll_outputs(slots)
        finished = states == _FINISHED
        started = states >= _RUNNING  # RUNNING or FINISHED: the count means something only then
        news = np.flatnonzero(finished | (started & (counts != self._num_read[slots])))
        by_slot = self._by_slot
        for slot, n, done in zip(
            slots[news].tolist(), counts[news].tolist(), finished[news].tolist(), strict=True
        ):
            self._take(by_slot[slot], n, done)

    def _relay_handoffs(self) -> None:
        """--pd: requests whose prefill replica handed them off go to their decode replica's ring.
        --role prefill: they end here (their slot freed), with `handoff` saying where their KV
        went, after every token published before the handoff was delivered."""
        for h in list(self._handing.values()):
            state, _, n = self._region.poll_output(h.slot)
            if state != _HANDOFF:
                continue
            if not self._pd:
                self._take(h, n, False)
                h.handoff = (*self._region.read_handed_off(h.slot), self._region.read_tokens(h.slot, 0, n))
                self._forget(h)
                self._region.release_handoff(h.slot, h.gen)
                h._finish(FinishReason.NONE, h.handoff[2])
            elif self._region.relay_handoff(h.slot, h.gen, h.decode):
                del self._handing[h.slot]
                self._prefills.finished(h.source)
                h.replica = h.decode

    def _take(self, h: RequestHandle, n: int, done: bool) -> None:
        """Deliver tokens up to count `n` (read with acquire); end the request if it finished."""
        if h.logprob_next >= 0:  # read after the count: covers every token counted
            self._take_logprobs(h)
        start = int(self._num_read[h.slot])
        if n > start:
            self._num_read[h.slot] = n
            h._deliver(self._region.read_tokens(h.slot, start, n))
        if done:  # n is final and every token was delivered above
            self._end(h)

    def _take_logprobs(self, h: RequestHandle) -> None:
        """Copy the log-probabilities published since the last copy, then give their places in
        the ring back to the engine (also for an abandoned handle, which drops them)."""
        start, end = h.logprob_next, self._region.logprob_end(h.slot)
        if end <= start:
            return
        chosen, ids, top = self._region.read_logprobs(h.slot, start, end, h.logprob_k)
        self._region.set_logprob_read(h.slot, end)
        h.logprob_next = end
        h._deliver_logprobs(LogprobChunk(start, chosen.tolist(), ids.tolist(), top.tolist()))

    def _forget(self, h: RequestHandle) -> None:
        """The reader no longer follows `h`'s slot."""
        self._logprob_handles.pop(h.slot, None)
        del self._active[h.slot]
        self._by_slot[h.slot] = None
        self._mask[h.slot] = False
        self._slots = None
        if self._chooser is not None:
            self._chooser.finished(h.replica)
        elif self._pd:
            if self._handing.pop(h.slot, None) is not None:
                self._prefills.finished(h.source)
            self._decodes.finished(h.decode - self._pd)
        else:
            self._handing.pop(h.slot, None)

    def _end(self, h: RequestHandle) -> None:
        self._forget(h)
        reason, cached = self._region.read_finish(h.slot)
        h.queue_time = self._region.read_queue_time(h.slot)
        self._region.free_slot(h.slot, h.gen)
        h._finish(reason, cached)

    async def _watch_engine(self) -> None:
        """End the requests of a replica that died, promptly; also a safety net for lost wake-ups."""
        ticks = 0
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            alive = self._replicas_alive()
            if not all(alive):
                self._on_wake()  # deliver what the engines published before one died
                for k in [k for k, ok in enumerate(alive) if not ok and k not in self._dead_replicas]:
                    self._fail_replica(k)
                if len(self._dead_replicas) == self.num_replicas:
                    return
            ticks += 1
            if ticks % 10 == 0 and self._active:
                self._on_wake()

    def _fail_replica(self, replica: int) -> None:
        """Replica `replica` died: its requests end with an error (nobody will ever finish their
        slots, which stay taken until the server stops); new requests are refused from now on."""
        self.dead = True
        self._dead_replicas.add(replica)
        # --pd: a request depends on its prefill replica (which sends its KV) and its decode replica
        # (which would receive it) alike, wherever it is now
        lost = [h for h in self._active.values() if replica in (h.replica, h.source, h.decode)]
        if lost:
            which = f"engine replica {replica}" if self.num_replicas > 1 else "engine"
            log.error("%s died with %d requests in flight", which, len(lost))
        for h in lost:
            self._forget(h)
            h.replica = replica  # the one the error names
            h._fail()
