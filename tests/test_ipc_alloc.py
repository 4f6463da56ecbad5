"""Slot allocation under contention: processes hammer alloc_slot/free_slot on one region.

The workers are forked from the creator and use its FrontendRegion through the inherited shared
mapping: allocating slots is the frontend's business, which an engine view cannot do."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import random
import uuid
from collections import defaultdict

import pytest

from lightllm_async.ipc import FrontendRegion, Region, RegionSpec, SlotState, atomics

NUM_SLOTS = 7
WORKERS = 4
ITERS = 10000


def _hammer(region: FrontendRegion, held: mmap.mmap, rng: random.Random) -> tuple[list[tuple[int, int]], int]:
    """Alloc and free at random, holding up to 3 slots; `held[slot]` counts holders across processes."""
    mine: list[tuple[int, int]] = []
    got, violations = [], 0
    for _ in range(ITERS):
        if mine and (len(mine) == 3 or rng.random() < 0.5):
            slot, gen = mine.pop(rng.randrange(len(mine)))
            violations += atomics.fetch_add_u32(held, 4 * slot, -1) != 1
            violations += not region.free_slot(slot, gen)
        else:
            ref = region.alloc_slot()
            if ref is not None:
                violations += atomics.fetch_add_u32(held, 4 * ref[0], 1) != 0
                mine.append(ref)
                got.append(ref)
    for slot, gen in mine:
        atomics.fetch_add_u32(held, 4 * slot, -1)
        region.free_slot(slot, gen)
    return got, violations


def _worker(region: FrontendRegion, held: mmap.mmap, seed: int, start, conn) -> None:  # type: ignore[no-untyped-def]
    try:
        start.wait(10)
        conn.send(_hammer(region, held, random.Random(seed)))
        region.close()
    except BaseException as e:  # noqa: BLE001 - report to the parent, which fails the test
        conn.send(repr(e))
    finally:
        conn.close()
        os._exit(0)


@pytest.fixture
def region():
    r = Region.create(f"t{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(NUM_SLOTS, 16))
    yield r
    r.close()
    r.unlink()


def test_contending_processes_never_share_or_lose_a_slot(region):
    held = mmap.mmap(-1, 4 * NUM_SLOTS)
    ctx = mp.get_context("fork")
    pipes, start = [ctx.Pipe(duplex=False) for _ in range(WORKERS)], ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(region, held, i, start, w)) for i, (_, w) in enumerate(pipes)]
    for p in procs:
        p.start()
    results = [r.recv() if r.poll(60) else "no answer" for r, _ in pipes]
    for p in procs:
        p.join(10)
    assert all(isinstance(r, tuple) for r in results), results
    assert sum(v for _, v in results) == 0  # nobody got a slot someone else held
    refs = [ref for got, _ in results for ref in got]
    assert len(refs) == len(set(refs))  # no (slot, gen) handed out twice
    gens = defaultdict(list)
    for slot, gen in refs:
        gens[slot].append(gen)
    for slot in range(NUM_SLOTS):  # each free bumped the generation exactly once
        assert sorted(gens[slot]) == list(range(len(gens[slot])))
        assert region.control(slot) == (SlotState.FREE, len(gens[slot]))
    assert region.num_free_slots() == NUM_SLOTS
    assert sorted(region.alloc_slot()[0] for _ in range(NUM_SLOTS)) == list(range(NUM_SLOTS))
    assert region.alloc_slot() is None
