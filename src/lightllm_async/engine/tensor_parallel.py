"""The engine's two roles under tensor parallelism (ARCHITECTURE.md §6).

Rank 0 runs the ordinary `Engine` (scheduler, region, outbox) with a `LeaderRunner`: each batch
is published in the group's step channel (ipc/steps.py) before it is launched. Ranks 1..N-1 run
a `Follower`: read the next record, launch the same batch on their shards, collect the one before
(the same overlap as rank 0, so the same PENDING_TOKEN inputs resolve to the same samples).

A step that fails on any rank cannot be undone on the others (they ran it, or they wait inside
a collective), so under tensor parallelism every step failure is a DeviceFailure: the engine ends
and the server exits for its supervisor, as it does when a single engine's device fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from lightllm_async.batch import Batch, DeviceFailure, Sampled
from lightllm_async.engine.engine import device_times
from lightllm_async.ipc.steps import StepReader, StepWriter

log = logging.getLogger(__name__)

IDLE_CHECK_S = 0.25  # an idle follower checks for its stop and its parent this often
LOG_INTERVAL_S = 5.0  # while busy, one progress line this often (as rank 0's engine)


class LeaderRunner:
    """Rank 0's runner: publish, then launch."""

    def __init__(self, runner: Any, writer: StepWriter):
        self.runner, self.writer = runner, writer

    @property
    def num_kv_tokens(self) -> int:
        return self.runner.num_kv_tokens

    def launch(self, batch: Batch) -> Any:
        # A record that did not reach every follower (across hosts: a peer died inside the
        # broadcast) leaves the ranks out of step as surely as a failed forward does.
        self._fatal(self.writer.publish, batch)
        return self._fatal(self.runner.launch, batch)

    def collect(self, handle: Any) -> Sampled:
        return self._fatal(self.runner.collect, handle)

    def idle(self) -> None:
        """The engine has nothing in flight: across hosts, a keepalive to the followers (a peer
        host's death is noticed only by a collective that touches it)."""
        self.writer.idle()

    def stop_followers(self) -> None:
        self.writer.stop()

    @staticmethod
    def _fatal(fn, arg):
        try:
            return fn(arg)
        except DeviceFailure:
            raise
        except Exception as exc:
            raise DeviceFailure(
                f"a tensor-parallel step failed, which the other ranks cannot undo: {exc!r}"
            ) from exc


class Follower:
    """Ranks 1..N-1: run rank 0's steps until it stops, or `stop` is set, or the parent is gone."""

    def __init__(self, reader: StepReader, runner: Any):
        self.reader, self.runner = reader, runner
        self.stop = threading.Event()
        self.parent_pid = os.getppid()
        self.steps = 0
        # where a busy follower's time goes, since the last progress line: steps, then seconds
        # waiting for rank 0's next record, launching, waiting for the device (the engine's line
        # has rank 0's; a follower whose launch comes late holds every rank in the first collective)
        self._times = [0, 0.0, 0.0, 0.0]
        self._logged = time.monotonic()

    def run(self) -> None:
        inflight, clock, times = None, time.perf_counter, self._times
        while not self.stop.is_set():
            t0 = clock()
            try:
                batch = self.reader.next(timeout=IDLE_CHECK_S)
            except TimeoutError:
                if inflight is not None:
                    self.runner.collect(inflight)
                    inflight = None
                if os.getppid() != self.parent_pid:
                    log.warning("the server process is gone; rank exits")
                    return
                self.log_progress()
                continue
            if batch is None:  # rank 0 left its loop
                break
            t1 = clock()
            handle = self.runner.launch(batch)
            t2 = clock()
            if inflight is not None:
                self.runner.collect(inflight)
            inflight = handle
            self.steps += 1
            times[0] += 1
            times[1] += t1 - t0
            times[2] += t2 - t1
            times[3] += clock() - t2
            if times[0] % 64 == 0:
                self.log_progress()
        if inflight is not None:
            self.runner.collect(inflight)

    def log_progress(self) -> None:
        """At most every LOG_INTERVAL_S, when it ran steps: one line of where a step's time went."""
        now = time.monotonic()
        steps, *secs = self._times
        if now - self._logged < LOG_INTERVAL_S or not steps:
            return
        self._logged, self._times[:] = now, [0, 0.0, 0.0, 0.0]
        per_step = "/".join(f"{1e3 * x / steps:.2f}" for x in secs)
        log.info(
            "%d steps, ms/step record wait/launch/device wait %s%s",
            steps,
            per_step,
            device_times(self.runner),
        )
