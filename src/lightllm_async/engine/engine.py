"""The engine's step loop: drain inbox -> schedule -> launch -> complete the previous step -> publish.

Failure isolation: an exception from a step concerns the requests in it. They are recomputed as
suspects, each alone, and the one that fails alone ends with an error while the engine goes on.
Only a `DeviceFailure`, or a run of failures that no step survives, ends the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Protocol

from lightllm_async.batch import Batch, DeviceFailure, Sampled, logprob_rows
from lightllm_async.engine.kv_manager import KVManager
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Finished, Scheduler
from lightllm_async.ipc import EngineRegion, EngineStats, Op
from lightllm_async.types import FinishReason, InvalidParam

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25  # an idle engine checks for its stop and its parent this often
MAX_CONSECUTIVE_FAILURES = 16  # failed steps with no success between them: the engine is broken
LOG_INTERVAL_S = 5.0  # while busy, one progress line this often


class Runner(Protocol):
    """What the engine needs of a model runner (runner/model_runner.py; runner/dummy.py)."""

    num_kv_tokens: int

    def launch(self, batch: Batch) -> Any: ...

    def collect(self, handle: Any) -> Sampled: ...


def device_times(runner: Any) -> str:
    """The device's own step times since the last call (LLA_STEP_TIMING=1: runner/model_runner.py
    StepTimes), from the runner or the one it wraps; '' without them."""
    while runner is not None:
        times = getattr(runner, "step_times", None)
        if times is not None:
            return times.summary()
        runner = getattr(runner, "runner", None)
    return ""


class EngineBroken(RuntimeError):
    """Every recent step failed, whichever requests were in it."""


class Engine:
    """Engine rank 0: owns the scheduler and drives the runner; talks to the frontend only through
    its view of the region. `step()` does one iteration; `run()` loops until `stop` is set or the
    parent process is gone."""

    def __init__(self, region: EngineRegion, scheduler: Scheduler, runner: Runner, pd: Any = None):
        self.region = region
        self.scheduler = scheduler
        self.runner = runner
        self.pd = pd  # --pd: this replica's half of the handoff (engine/disagg.py), or None
        # upkeep of a runner while nothing is in flight (tensor_parallel.LeaderRunner: keepalives)
        self._runner_idle = getattr(runner, "idle", None)
        self.stop = threading.Event()
        self.parent_pid = os.getppid()
        self._inflight: tuple[Batch, Any] | None = None
        self._failures = 0  # consecutive failed steps
        self._arrivals = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._logged = (time.monotonic(), 0, 0)  # when the last progress line went out, and the totals then
        self._logprob_slots: set[int] = set()  # requests whose log-probabilities use the ring
        # where a step's wall time goes, since the last progress line: steps, then seconds in
        # schedule (inbox included), launch, waiting for the device, update + outbox
        self._times = [0, 0.0, 0.0, 0.0, 0.0]
        # loop turns that launched nothing and waited: while there was work (count, seconds), and
        # for work to arrive (count, seconds)
        self._polls = [0, 0.0, 0, 0.0]

    def run(self) -> None:
        """Overlapped steps: step N+1 is scheduled and launched before step N's tokens are read,
        so the host work between steps hides behind the device's work."""
        while not self.stop.is_set():
            if self.step():
                continue
            if os.getppid() != self.parent_pid:
                log.warning("the server process is gone; engine exits")
                return
            if self._runner_idle is not None:
                self._runner_idle()
            busy = self.scheduler.has_work() or (self.pd is not None and self.pd.busy)
            t0 = time.perf_counter()
            self.region.wait_engine(timeout=0.005 if busy else IDLE_WAIT_S)
            self._polls[0 if busy else 2] += 1
            self._polls[1 if busy else 3] += time.perf_counter() - t0
            self.region.beat()  # an idle engine is alive too: the server's watchdog reads this

    def step(self) -> bool:
        """One iteration: admit what arrived, launch the next step, complete the one in flight.
        False when there was nothing to launch or complete (the caller may sleep)."""
        t0 = time.perf_counter()
        self.drain_inbox()
        moved = self.pd is not None and self.pd.progress(self)
        if moved:  # KV came back or arrived: /metrics and the tests read it from the stats
            self.publish_stats()
        self._refresh_logprob_limits()
        batch = self.scheduler.schedule()
        scheduled = time.perf_counter() - t0
        if self.scheduler.first_admitted:  # the end of their queue time
            for req in self.scheduler.first_admitted:
                self.region.set_scheduled(req.slot)
            self.scheduler.first_admitted.clear()
        previous, self._inflight = self._inflight, None
        if batch is not None:
            self._times[0] += 1
            self._times[1] += scheduled  # only steps' scheduling: an idle loop's polls are not counted
            try:
                t0 = time.perf_counter()
                self._inflight = (batch, self.runner.launch(batch))
                self._times[2] += time.perf_counter() - t0
            except Exception as exc:
                self._step_failed(batch, exc, [previous[0]] if previous else [])
                return True
        if previous is not None:
            try:
                self.complete(*previous)
            except Exception as exc:
                launched = [self._inflight[0]] if self._inflight else []
                self._inflight = None
                self._step_failed(previous[0], exc, launched)
        return batch is not None or previous is not None or moved

    def complete(self, batch: Batch, handle: Any) -> None:
        """Read a launched step's tokens, apply them, publish."""
        t0 = time.perf_counter()
        sampled = self.runner.collect(handle)
        t1 = time.perf_counter()
        self._times[3] += t1 - t0
        logprobs = self._live_logprobs(batch, sampled)  # before update retires finished requests
        applied, finished = self.scheduler.update(batch, sampled)
        self._failures = 0
        self.publish(applied, finished, logprobs)
        self.region.beat()
        self._times[4] += time.perf_counter() - t1

    # -- log-probabilities ------------------------------------------------------------------

    def _refresh_logprob_limits(self) -> None:
        """How far each request with log-probabilities may run ahead of the frontend's reader."""
        by_slot = self.scheduler.by_slot
        for slot in list(self._logprob_slots):
            req = by_slot.get(slot)
            if req is None or not req.params.wants_logprobs:
                self._logprob_slots.discard(slot)
            else:
                req.logprob_limit = self.region.logprob_limit(slot)

    def _live_logprobs(self, batch: Batch, sampled: Sampled) -> tuple | None:
        """The step's log-probability rows of requests still here (slot, gen): (slots, positions,
        chosen, top_ids, top_logprobs), or None."""
        rows = logprob_rows(batch)
        if not rows:
            return None
        if sampled.logprobs is None:
            raise ValueError("the runner returned no log-probabilities for a step that asked for them")
        by_slot = self.scheduler.by_slot
        live = [
            i for i, r in enumerate(rows) if (req := by_slot.get(r.slot)) is not None and req.gen == r.gen
        ]
        lp = sampled.logprobs
        return (
            [rows[i].slot for i in live],
            [rows[i].position for i in live],
            lp.chosen[live],
            lp.top_ids[live],
            lp.top_logprobs[live],
        )

    # -- failure isolation --------------------------------------------------------------------

    def _step_failed(self, failed: Batch, exc: Exception, others: list[Batch]) -> None:
        """`failed` raised `exc`; `others` were in flight with it and are undone too."""
        if isinstance(exc, DeviceFailure):
            raise exc
        self._failures += 1
        if self._failures > MAX_CONSECUTIVE_FAILURES:
            raise EngineBroken(f"{self._failures} steps in a row failed; the last: {exc!r}") from exc
        culprit = self.scheduler.blame(failed)
        self.scheduler.recover([failed, *others])
        if culprit is None:
            log.warning("step %d failed (%r); its requests are retried one by one", failed.step, exc)
            return
        log.error("request in slot %d failed and was ended: %r", culprit.request.slot, exc)
        self.publish([], [culprit])

    # -- inbox ----------------------------------------------------------------------------------

    def drain_inbox(self) -> None:
        records = self.region.drain_ring()
        for rec in records:
            if rec.op == Op.SUBMIT:
                self._admit(rec.slot, rec.gen)
            elif rec.op == Op.ABORT and self.scheduler.abort(rec.slot) is not None:
                self._end(rec.slot, FinishReason.ABORT)
            elif rec.op == Op.HANDOFF and self.pd is not None:
                self.pd.arrived(rec.slot, rec.gen)
        if records:
            self.publish_stats()

    def _admit(self, slot: int, gen: int) -> None:
        if self.pd is not None and self.region.resumed_from(slot) >= 0:  # --role decode
            if self.region.take_over(slot, gen):
                self.pd.arrived(slot, gen)
            return
        try:
            view = self.region.read_request(slot, gen)
        except InvalidParam as exc:  # a slot no validated frontend wrote: that request alone fails
            log.error("slot %d holds an invalid request: %s", slot, exc)
            self.region.set_running(slot)
            self._end(slot, FinishReason.ERROR)
            return
        if view is None:  # the frontend reused the slot: a stale record
            return
        self.region.set_running(slot)
        if self.region.is_aborted(slot):
            self._end(slot, FinishReason.ABORT)
            return
        self._arrivals += 1
        self._prompt_tokens += len(view.prompt_ids)
        if view.params.wants_logprobs:
            self._logprob_slots.add(slot)
        req = Request(
            slot=slot, gen=gen, prompt_ids=view.prompt_ids, params=view.params, arrival=self._arrivals
        )
        if self.pd is not None and KVManager.shares_prefix(req):  # else it runs here to the end
            req.handoff_to = self.region.handoff_target(slot)
        self.scheduler.add(req)

    # -- --pd: requests handed over by a prefill replica (engine/disagg.py) -------------------

    def next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    def admit_transferred(self, req: Request, kv_slots: list[int]) -> None:
        """A handed-off request whose KV arrived in `kv_slots`: it runs here from now on."""
        self.region.resume(req.slot)
        if self.region.is_aborted(req.slot):
            self.scheduler.tokens.free(kv_slots)
            self._end(req.slot, FinishReason.ABORT)
            return
        if req.params.wants_logprobs:
            self._logprob_slots.add(req.slot)
        self.scheduler.add_transferred(req, kv_slots)

    def end_request(self, slot: int, reason: FinishReason) -> None:
        self._end(slot, reason)

    def _end(self, slot: int, reason: FinishReason) -> None:
        self.region.finish(slot, reason)
        self.region.notify_frontend()

    # -- outbox ---------------------------------------------------------------------------------

    def publish(
        self, applied: list[tuple[int, int]], finished: list[Finished], logprobs: tuple | None = None
    ) -> None:
        """Log-probabilities, then tokens (each count published with a release store: a reader that
        sees a token sees its log-probability), then finish marks, one wake-up."""
        if logprobs is not None:
            self.region.put_logprobs(*logprobs)
        if applied:
            slots, tokens = zip(*applied, strict=True)
            self.region.append_step(slots, tokens)
        for f in finished:
            if f.handoff_kv:
                self.pd.hand_off(f)
                continue
            self.region.set_cached_tokens(f.request.slot, f.request.cached_tokens or 0)
            self.region.finish(f.request.slot, f.reason)
        self._generated_tokens += len(applied)
        self.publish_stats()
        self.region.notify_frontend()

    def log_progress(self, now: float | None = None) -> bool:
        """Every LOG_INTERVAL_S while there is work: one info line of throughput and load (never a
        prompt). True if it logged."""
        now = time.monotonic() if now is None else now
        then, prompt, generated = self._logged
        if now - then < LOG_INTERVAL_S:
            return False
        self._logged = (now, self._prompt_tokens, self._generated_tokens)
        s, dt = self.scheduler, now - then
        if not s.has_work() and prompt == self._prompt_tokens and generated == self._generated_tokens:
            return False
        used = 1 - s.num_free_tokens / s.kv.capacity if s.kv.capacity else 0.0
        steps, *secs = self._times
        polls, polled, idles, idled = self._polls
        self._times, self._polls = [0, 0.0, 0.0, 0.0, 0.0], [0, 0.0, 0, 0.0]
        # the rest of the wall time: loop turns that launched nothing (their schedule, the waits
        # counted here), and whatever else held this process
        other = max(0.0, dt - sum(secs))
        per_step = "/".join(f"{1e3 * x / max(steps, 1):.2f}" for x in (*secs, other))
        log.info(
            "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%% used, "
            "%d preemptions; %d steps, ms/step schedule/launch/device wait/outbox/other %s "
            "(waits: %d with work %.0f ms, %d for work %.0f ms)%s%s",
            (self._prompt_tokens - prompt) / dt,
            (self._generated_tokens - generated) / dt,
            len(s.running),
            len(s.waiting),
            100 * used,
            s.num_preemptions,
            steps,
            per_step,
            polls,
            1e3 * polled,
            idles,
            1e3 * idled,
            device_times(self.runner),
            self.pd.summary() if self.pd is not None else "",
        )
        return True

    def publish_stats(self) -> None:
        self.log_progress()
        s = self.scheduler
        self.region.set_engine_stats(
            EngineStats(
                num_running=len(s.running),
                num_waiting=len(s.waiting),
                kv_tokens_free=s.num_free_tokens,
                kv_tokens_total=s.kv.capacity,
                num_preemptions=s.num_preemptions,
                prompt_tokens_total=self._prompt_tokens,
                generation_tokens_total=self._generated_tokens,
                cached_tokens_total=s.prefix_hit_tokens,
                prefix_queried_tokens_total=s.prefix_queried_tokens,
                kv_sent_tokens_total=getattr(self.pd, "sent_tokens", 0),
                kv_received_tokens_total=getattr(self.pd, "received_tokens", 0),
            )
        )
