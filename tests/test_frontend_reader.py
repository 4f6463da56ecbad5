"""The Reader against an engine in another process: no wake-up is lost, on either of its paths.

The reader's safety-net poll is switched off here, so a lost wake-up leaves a request hanging
instead of being hidden by a late poll.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
import uuid

import pytest

from lightllm_async.frontend import reader as reader_mod
from lightllm_async.frontend.reader import Reader
from lightllm_async.ipc import Op, Region, RegionSpec
from lightllm_async.types import FinishReason, SamplingParams

NUM_SLOTS = 16


def _engine(name: str, stop) -> None:
    """Token k of a request is k + 1000 * slot; steps come at irregular moments, so a step often
    lands while the reader is in the middle of a pass."""
    region, rng = Region.attach(name), random.Random(5)
    running: dict[int, list[int]] = {}  # slot -> [max_new, emitted]
    while not stop.value:
        for rec in region.drain_ring():
            if rec.op == Op.SUBMIT and (view := region.read_request(rec.slot, rec.gen)) is not None:
                region.set_running(rec.slot)
                running[rec.slot] = [view.params.max_new_tokens, 0]
        if not running:
            region.wait_engine(0.01, spin=0.0)
            continue
        slots = list(running)
        region.append_step(slots, [1000 * s + running[s][1] for s in slots])
        for s in slots:
            running[s][1] += 1
            if running[s][1] == running[s][0]:
                del running[s]
                region.finish(s, FinishReason.LENGTH)
        region.notify_frontend()
        time.sleep(rng.choice([0, 0, 0, 1e-5, 5e-5, 2e-4]))
    region.close()


@pytest.mark.parametrize("few", [1000, 0], ids=["one_by_one", "vectorized"])
def test_no_wakeup_is_lost_between_engine_and_reader(monkeypatch, few):
    monkeypatch.setattr(reader_mod, "_FEW", few)
    monkeypatch.setattr(reader_mod, "LIVENESS_INTERVAL_S", 3600.0)  # no safety-net poll
    region = Region.create(f"rd{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(NUM_SLOTS, 64))
    ctx = mp.get_context("fork")
    stop = ctx.RawValue("i", 0)
    engine = ctx.Process(target=_engine, args=(region.name, stop))
    engine.start()

    async def client(reader: Reader, rng: random.Random, n: int) -> int:
        done = 0
        for _ in range(n):
            max_new = rng.randint(1, 12)
            h = reader.submit([1, 2, 3], SamplingParams(max_new_tokens=max_new))
            tokens: list[int] = []
            while True:  # as Generation reads: a finish seen after wait() came with every token
                tokens += await h.wait()  # a lost wake-up hangs here
                if h.finish_reason is not None:
                    break
            assert tokens == [1000 * h.slot + k for k in range(max_new)]
            done += 1
        return done

    async def main() -> int:
        reader = Reader(region, engine.is_alive)
        await reader.start()
        try:
            # one at a time: a step missed while the reader is busy has no later step to rescue it
            done = await client(reader, random.Random(99), 300)
            rngs = [random.Random(i) for i in range(6)]
            return done + sum(await asyncio.gather(*(client(reader, r, 150) for r in rngs)))
        finally:
            await reader.stop()

    try:
        assert asyncio.run(asyncio.wait_for(main(), 60)) == 1200
        assert region.num_free_slots() == NUM_SLOTS
    finally:
        stop.value = 1
        engine.join(5)
        region.close()
        region.unlink()
