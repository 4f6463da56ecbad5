"""The engine's step loop: drain inbox -> schedule -> execute -> update -> publish."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from lightllm_async.batch import Batch, Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Finished, Scheduler
from lightllm_async.ipc import EngineRegion, EngineStats, Op
from lightllm_async.types import FinishReason

log = logging.getLogger(__name__)


class Runner(Protocol):
    def launch(self, batch: Batch) -> Any: ...

    def collect(self, handle: Any) -> Sampled: ...


class InjectedFailure(RuntimeError):
    """Raised by the test hook that makes a forward pass fail after N steps."""


class Engine:
    """Rank 0's loop. Ranks that follow would receive `batch` instead of scheduling it."""

    def __init__(self, region: EngineRegion, scheduler: Scheduler, runner: Runner, fail_after_steps: int = 0):
        self.region = region
        self.scheduler = scheduler
        self.runner = runner
        self.fail_after_steps = fail_after_steps
        self.parent_pid = os.getppid()
        self._arrivals = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0

    def run(self) -> None:
        """Overlapped steps: step N+1 is scheduled and launched before step N's tokens are read,
        so the host work between steps hides behind the device's work."""
        inflight: tuple[Batch, Any] | None = None
        while True:
            self.drain_inbox()
            batch = self.scheduler.schedule()
            launched = None if batch is None else (batch, self.launch(batch))
            if inflight is not None:
                self.finish(*inflight)
            inflight = launched
            if inflight is None:
                if os.getppid() != self.parent_pid:
                    log.warning("the server process is gone; engine exits")
                    return
                self.region.wait_engine(timeout=0.005 if self.scheduler.has_work() else 0.5)

    def launch(self, batch: Batch) -> Any:
        if self.fail_after_steps and batch.step > self.fail_after_steps:
            raise InjectedFailure(f"injected failure at step {batch.step}")
        return self.runner.launch(batch)

    def finish(self, batch: Batch, handle: Any) -> None:
        applied, finished = self.scheduler.update(batch, self.runner.collect(handle))
        self.publish(applied, finished)
        self.region.beat()

    def drain_inbox(self) -> None:
        records = self.region.drain_ring()
        for rec in records:
            if rec.op == Op.SUBMIT:
                self._admit(rec.slot, rec.gen)
            elif rec.op == Op.ABORT and self.scheduler.abort(rec.slot) is not None:
                self.region.finish(rec.slot, FinishReason.ABORT)
                self.region.notify_frontend()
        if records:
            self.publish_stats()

    def _admit(self, slot: int, gen: int) -> None:
        view = self.region.read_request(slot, gen)
        if view is None:  # the frontend reused the slot: a stale record
            return
        self.region.set_running(slot)
        max_len = self.scheduler.cfg.max_model_len
        if not view.prompt_ids or len(view.prompt_ids) >= max_len or self.region.is_aborted(slot):
            # The frontend validates lengths; this guards the engine against a bad record.
            reason = FinishReason.ABORT if self.region.is_aborted(slot) else FinishReason.ERROR
            self.region.finish(slot, reason)
            self.region.notify_frontend()
            return
        self._arrivals += 1
        self._prompt_tokens += len(view.prompt_ids)
        self.scheduler.add(
            Request(
                slot=slot, gen=gen, prompt_ids=view.prompt_ids, params=view.params, arrival=self._arrivals
            )
        )

    def publish(self, applied: list[tuple[int, int]], finished: list[Finished]) -> None:
        """Tokens first (each count published with a release store), then finish marks, one wake-up."""
        if applied:
            slots, tokens = zip(*applied, strict=True)
            self.region.append_step(slots, tokens)
        for f in finished:
            self.region.finish(f.request.slot, f.reason)
        self._generated_tokens += len(applied)
        self.publish_stats()
        self.region.notify_frontend()

    def publish_stats(self) -> None:
        s = self.scheduler
        self.region.set_engine_stats(
            EngineStats(
                num_running=len(s.running),
                num_waiting=len(s.waiting),
                kv_tokens_free=s.tokens.num_free,
                kv_tokens_total=s.tokens.capacity,
                num_preemptions=s.num_preemptions,
                prompt_tokens_total=self._prompt_tokens,
                generation_tokens_total=self._generated_tokens,
            )
        )
