"""The one reader per process: engine wake-ups → per-request token buffers on the event loop.

A helper thread blocks on the frontend semaphore and hands each wake-up to the event loop, which
copies every active slot's new output tokens into its `RequestHandle` and wakes the handler
awaiting it. Handlers never touch the region's output side and never poll.

The reader also owns slot lifetime: a slot goes back to the free list only after the engine has
marked it FINISHED and the last tokens were copied, whether the handler still listens or has
aborted (an abort is a flag the engine acknowledges by finishing the slot with ABORT).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from lightllm_async.ipc import FinishReason, Region, RequestParams

log = logging.getLogger(__name__)

WAIT_TIMEOUT_S = 0.25  # the helper thread re-checks for shutdown this often
LIVENESS_INTERVAL_S = 0.1  # engine_alive() checks; the server gives in-flight requests 1 s


class EngineDead(Exception):
    """The engine process is gone; requests in flight cannot finish."""


class RequestHandle:
    """One request's output as the reader delivers it. Used on the event loop only."""

    __slots__ = (
        "slot",
        "gen",
        "_tokens",
        "finish_reason",
        "cached_tokens",
        "engine_dead",
        "disconnected",
        "abandoned",
        "num_read",
        "_event",
    )

    def __init__(self, slot: int, gen: int):
        self.slot = slot
        self.gen = gen
        self._tokens: list[int] = []  # copied but not yet taken by the handler
        self.finish_reason: FinishReason | None = None  # set once the engine finished the slot
        self.cached_tokens = 0
        self.engine_dead = False
        self.disconnected = False  # set by the handler's disconnect watcher
        self.abandoned = False  # the handler stopped reading; drop tokens, free on finish
        self.num_read = 0  # output tokens copied out of the slot so far
        self._event = asyncio.Event()

    async def wait(self) -> list[int]:
        """Wait for news (tokens, finish, death, disconnect); return the new tokens."""
        if not (self._tokens or self.finish_reason is not None or self.engine_dead or self.disconnected):
            await self._event.wait()
        self._event.clear()
        tokens, self._tokens = self._tokens, []
        return tokens

    def notify_disconnect(self) -> None:
        self.disconnected = True
        self._event.set()

    # The reader's side: news about the slot.

    def _deliver(self, tokens: list[int]) -> None:
        self.num_read += len(tokens)
        if not self.abandoned:
            self._tokens.extend(tokens)
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
    """Owns the frontend side of the region's output: submit, read, abort, free."""

    def __init__(self, region: Region, engine_alive: Callable[[], bool]):
        self._region = region
        self._engine_alive = engine_alive
        self._active: dict[int, RequestHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_pending = False
        self._liveness: asyncio.Task | None = None
        self.dead = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._wait_loop, name="frontend-reader", daemon=True)
        self._thread.start()
        self._liveness = asyncio.create_task(self._watch_engine())

    async def stop(self) -> None:
        self._stopping.set()
        if self._liveness is not None:
            self._liveness.cancel()
        if self._thread is not None:
            # A post of our own semaphore wakes the thread now; a spurious wake-up is harmless.
            # Joining matters: the server closes the region (and its semaphores) after us.
            self._region.notify_frontend()
            await asyncio.to_thread(self._thread.join, WAIT_TIMEOUT_S * 4)
            self._thread = None

    @property
    def num_active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------ requests

    def submit(self, prompt_ids: Sequence[int], params: RequestParams) -> RequestHandle | None:
        """Start a request; None when every slot is taken. Raises EngineDead."""
        if self.dead:
            raise EngineDead
        got = self._region.alloc_slot()
        if got is None:
            return None
        slot, gen = got
        try:
            self._region.write_request(slot, prompt_ids, params)
            self._region.submit(slot, gen)
        except BaseException:
            self._region.free_slot(slot, gen)  # still WRITING: the engine never saw it
            raise
        handle = RequestHandle(slot, gen)
        self._active[slot] = handle  # before any wake-up can be handled: we are on the loop
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request the handler no longer reads; its slot is freed when the engine agrees."""
        handle._abandon()
        if handle.finish_reason is None and not handle.engine_dead:
            self._region.abort(handle.slot, handle.gen)

    # ------------------------------------------------------------ wake-ups

    def _wait_loop(self) -> None:
        """Helper thread: block on the semaphore, schedule at most one pending wake-up."""
        loop = self._loop
        while not self._stopping.is_set():
            try:
                woke = self._region.wait_frontend(WAIT_TIMEOUT_S)
            except Exception:
                log.exception("frontend semaphore wait failed; reader thread stops")
                return
            if woke and not self._wake_pending:
                self._wake_pending = True
                try:
                    loop.call_soon_threadsafe(self._on_wake)
                except RuntimeError:  # the loop is closed: we are shutting down
                    return

    def _on_wake(self) -> None:
        self._wake_pending = False  # cleared before reading, so a later post is never lost
        for handle in list(self._active.values()):
            self._poll(handle)

    def _poll(self, h: RequestHandle) -> None:
        view = self._region.read_output(h.slot, h.num_read)
        if view.tokens:
            h._deliver(view.tokens)
        if view.finished:  # num_tokens is final and every token was read above
            del self._active[h.slot]
            self._region.free_slot(h.slot, h.gen)
            h._finish(FinishReason(view.finish_reason), view.cached_tokens)

    async def _watch_engine(self) -> None:
        """End every request promptly when the engine dies; also a safety net for lost wake-ups."""
        ticks = 0
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            if not self._engine_alive():
                self._on_wake()  # deliver what the engine published before it died
                self._fail_all()
                return
            ticks += 1
            if ticks % 10 == 0 and self._active:
                self._on_wake()

    def _fail_all(self) -> None:
        self.dead = True
        if self._active:
            log.error("engine died with %d requests in flight", len(self._active))
        for h in self._active.values():
            h._fail()
        self._active.clear()  # nobody will ever finish these slots
