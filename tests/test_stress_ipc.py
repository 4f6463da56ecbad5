"""Many producers, one engine, one region, for a while: nothing is lost, held twice or ended twice.

  engine process     drains the ring, runs each request for its max_new_tokens steps (one
                     append_step over all running slots per step), honours aborts, logs finishes
  churn processes    take slots and give them back (WRITING -> FREE): contention on the allocator
                     (forked from this one, on its FrontendRegion: only a frontend view allocates)
  producer threads   (here, sharing the ring with the reader) submit, abort at random, poll, free
  reader tasks       (on this process's event loop, through the real Reader) submit, abort at
                     random, read; the Reader frees

Every output token is a function of (slot, generation, position), so a reader that sees a count
ahead of its tokens, or another request's tokens, fails. `held` counts the holders of each slot
across all processes and threads. At the end every slot is FREE with a generation equal to the
number of times it was freed, the free list is whole, the ring is empty, and every request ended
exactly once on both sides, with the same reason and length.

CI runs it for a few seconds; `LLA_STRESS_SECONDS=120 pytest tests/test_stress_ipc.py` runs longer.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import multiprocessing as mp
import os
import random
import threading
import time
import uuid
from collections import Counter

from lightllm_async.frontend.reader import Reader
from lightllm_async.ipc import FrontendRegion, Op, Region, RegionSpec, SlotState, atomics
from lightllm_async.types import FinishReason, SamplingParams

SECONDS = float(os.environ.get("LLA_STRESS_SECONDS", "3"))
NUM_SLOTS, ARENA, MAX_NEW = 24, 64, 30
PRODUCER_THREADS, READER_TASKS, CHURN_PROCS = 3, 12, 2
_ids = itertools.count(1)


def token(slot: int, gen: int, k: int) -> int:
    return (slot * 1_000_003 + gen * 7919 + k * 104729) % 2_000_000_000 + 1


def prompt(rid: int) -> list[int]:
    return [rid, rid * 31 % 1_000_003, 7]  # the engine checks the relation: no torn request


def hold(held: mmap.mmap, slot: int, delta: int) -> bool:
    """Count a holder of `slot` in or out; False if someone else held it (or nobody did)."""
    return atomics.fetch_add_u32(held, 4 * slot, delta) == (0 if delta > 0 else 1)


# ---------------------------------------------------------------- the other processes


def engine_main(name: str, stop, conn) -> None:
    """Rank 0's loop with a runner that emits token(slot, gen, k); sends back its finish log."""
    region, log, rng = Region.attach(name), [], random.Random(1)
    running: dict[int, list[int]] = {}  # slot -> [gen, max_new, emitted]

    def end(slot: int, reason: FinishReason) -> None:
        gen, _, emitted = running.pop(slot)
        assert region.finish(slot, reason)
        log.append((slot, gen, int(reason), emitted))

    try:
        while not stop.value or running or region._ring.pending():
            logged = len(log)
            for rec in region.drain_ring():
                if rec.op == Op.SUBMIT and (view := region.read_request(rec.slot, rec.gen)) is not None:
                    rid = view.prompt_ids[0]
                    assert view.prompt_ids == prompt(rid), view.prompt_ids
                    assert region.set_running(rec.slot)
                    running[rec.slot] = [rec.gen, view.params.max_new_tokens, 0]
                    if region.is_aborted(rec.slot):
                        end(rec.slot, FinishReason.ABORT)
                elif rec.op == Op.ABORT and running.get(rec.slot, [None])[0] == rec.gen:
                    end(rec.slot, FinishReason.ABORT)
            if not running:
                if len(log) > logged:
                    region.notify_frontend()  # aborts of queued requests ended above
                region.wait_engine(0.01, spin=0.0002)
                continue
            slots = list(running)
            region.append_step(slots, [token(s, running[s][0], running[s][2]) for s in slots])
            for s in slots:
                running[s][2] += 1
                if running[s][2] == running[s][1]:
                    end(s, FinishReason.LENGTH)
            region.notify_frontend()
            if rng.random() < 0.05:
                time.sleep(0.0005)  # now and then the frontend gets ahead
        conn.send(log)
    except BaseException as e:  # noqa: BLE001 - report to the test
        conn.send(repr(e))
    finally:
        region.close()


def churn_main(region: FrontendRegion, held: mmap.mmap, stop, seed: int, conn) -> None:
    """Take a slot, hold it a moment, give it back."""
    rng, frees, bad = random.Random(seed), Counter(), 0
    while not stop.value:
        ref = region.alloc_slot()
        if ref is None:
            time.sleep(0.0002)
            continue
        bad += not hold(held, ref[0], 1)
        time.sleep(rng.random() * 0.0005)
        bad += not hold(held, ref[0], -1)
        bad += not region.free_slot(*ref)
        frees[ref[0]] += 1
    conn.send((frees, bad))
    region.close()


# ---------------------------------------------------------------- this process: threads and tasks


class Ledger:
    """What the frontend side saw: every submit, every end, every free; and any violation."""

    def __init__(self, held: mmap.mmap) -> None:
        self.held = held
        self.lock = threading.Lock()
        self.submitted: list[tuple[int, int]] = []
        self.ended: list[tuple[int, int, int, int]] = []  # slot, gen, reason, tokens
        self.frees: Counter = Counter()
        self.violations: list[str] = []

    def took(self, slot: int, gen: int) -> None:
        with self.lock:
            self.submitted.append((slot, gen))
            if not hold(self.held, slot, 1):
                self.violations.append(f"slot {slot} held twice")

    def gave_back(self, slot: int, gen: int, reason: int, n: int) -> None:
        with self.lock:
            self.ended.append((slot, gen, reason, n))
            self.frees[slot] += 1
            if not hold(self.held, slot, -1):
                self.violations.append(f"slot {slot} freed but not held")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            with self.lock:
                self.violations.append(what)


def producer_thread(region: FrontendRegion, ledger: Ledger, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        ref = region.alloc_slot()
        if ref is None:
            time.sleep(0.0002)
            continue
        slot, gen = ref
        max_new = rng.randint(1, MAX_NEW)
        region.write_request(slot, prompt(next(_ids)), SamplingParams(max_new_tokens=max_new))
        region.submit(slot, gen)
        ledger.took(slot, gen)
        abort_at = time.monotonic() + rng.random() * 0.004 if rng.random() < 0.3 else None
        while not (out := region.read_output(slot)).finished:
            if abort_at is not None and time.monotonic() >= abort_at:
                region.abort(slot, gen)
                abort_at = None
            time.sleep(0.0002)
        n = out.num_tokens
        ledger.check(out.tokens == [token(slot, gen, k) for k in range(n)], f"wrong tokens in {ref}")
        ledger.check(out.finish_reason == FinishReason.ABORT or n == max_new, f"wrong length in {ref}")
        ledger.gave_back(slot, gen, int(out.finish_reason), n)
        ledger.check(region.free_slot(slot, gen), f"free of {ref} refused")


class CountingReader(Reader):
    """The real Reader, counting its slots in and out of the ledger around its own alloc/free."""

    def __init__(self, region: FrontendRegion, ledger: Ledger) -> None:
        super().__init__(region, lambda: True)
        self.ledger = ledger

    def submit(self, prompt_ids, params):
        h = super().submit(prompt_ids, params)
        if h is not None:
            self.ledger.took(h.slot, h.gen)
        return h

    def _end(self, h) -> None:
        reason, _ = self._region.read_finish(h.slot)
        self.ledger.gave_back(h.slot, h.gen, int(reason), int(self._num_read[h.slot]))
        super()._end(h)


async def reader_tasks(region: FrontendRegion, ledger: Ledger, deadline: float) -> None:
    reader = CountingReader(region, ledger)
    await reader.start()

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            max_new = rng.randint(1, MAX_NEW)
            h = reader.submit(prompt(next(_ids)), SamplingParams(max_new_tokens=max_new))
            if h is None:
                await asyncio.sleep(0.0005)
                continue
            abort_after = rng.randint(0, MAX_NEW) if rng.random() < 0.3 else None
            tokens: list[int] = []
            while True:  # as Generation reads: a finish seen after wait() came with every token
                if abort_after is not None and len(tokens) >= abort_after and not h.abandoned:
                    reader.abort(h)  # the Reader frees the slot once the engine agrees
                tokens += await h.wait()
                if h.finish_reason is not None:
                    break
            if not h.abandoned:
                ref = (h.slot, h.gen)
                expected = [token(h.slot, h.gen, k) for k in range(len(tokens))]
                ledger.check(tokens == expected, f"wrong tokens in {ref} (reader)")
                ledger.check(h.finish_reason == FinishReason.ABORT or len(tokens) == max_new, f"length {ref}")

    await asyncio.gather(*(one(i) for i in range(READER_TASKS)))
    await reader.stop()


# ---------------------------------------------------------------- the test


def test_many_producers_one_engine_nothing_lost_held_twice_or_ended_twice():
    region = Region.create(f"st{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(NUM_SLOTS, ARENA))
    held = mmap.mmap(-1, 4 * NUM_SLOTS)
    ctx = mp.get_context("fork")  # before any thread of ours starts
    stop_engine, stop_churn = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
    (engine_rx, engine_tx), churn_pipes = ctx.Pipe(False), [ctx.Pipe(False) for _ in range(CHURN_PROCS)]
    procs = [ctx.Process(target=engine_main, args=(region.name, stop_engine, engine_tx))]
    procs += [
        ctx.Process(target=churn_main, args=(region, held, stop_churn, i, tx))
        for i, (_, tx) in enumerate(churn_pipes)
    ]
    try:
        for p in procs:
            p.start()
        ledger = Ledger(held)
        deadline = time.monotonic() + SECONDS
        threads = [
            threading.Thread(target=producer_thread, args=(region, ledger, deadline, i))
            for i in range(PRODUCER_THREADS)
        ]
        for t in threads:
            t.start()
        asyncio.run(asyncio.wait_for(reader_tasks(region, ledger, deadline), SECONDS + 30))
        for t in threads:
            t.join(30)
        stop_churn.value = 1
        churn = [rx.recv() if rx.poll(30) else "no answer" for rx, _ in churn_pipes]
        stop_engine.value = 1
        engine_log = engine_rx.recv() if engine_rx.poll(30) else "no answer"
        for p in procs:
            p.join(10)

        assert isinstance(engine_log, list), engine_log
        assert all(isinstance(c, tuple) for c in churn), churn
        assert ledger.violations == [] and sum(bad for _, bad in churn) == 0
        # every request ended exactly once, on both sides alike
        assert len(set(ledger.submitted)) == len(ledger.submitted) > 50
        ends = {(s, g): (r, n) for s, g, r, n in ledger.ended}
        assert len(ends) == len(ledger.ended) and set(ends) == set(ledger.submitted)
        assert {(s, g): (r, n) for s, g, r, n in engine_log} == ends and len(engine_log) == len(ends)
        reasons = Counter(r for r, _ in ends.values())
        assert reasons[FinishReason.ABORT] > 0 and reasons[FinishReason.LENGTH] > 0
        # every slot is back: free, with one generation per free, on a whole free list
        frees = ledger.frees + sum((c for c, _ in churn), Counter())
        assert sum(sum(c.values()) for c, _ in churn) > 0  # the churn really contended
        assert [region.control(s) for s in range(NUM_SLOTS)] == [
            (SlotState.FREE, frees[s]) for s in range(NUM_SLOTS)
        ]
        assert region.num_free_slots() == NUM_SLOTS and region._rings[0].pending() == 0
        assert held[:] == bytes(4 * NUM_SLOTS)
        assert sorted(region.alloc_slot()[0] for _ in range(NUM_SLOTS)) == list(range(NUM_SLOTS))
        assert region.alloc_slot() is None
    finally:
        stop_churn.value = stop_engine.value = 1
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        region.close()
        region.unlink()
