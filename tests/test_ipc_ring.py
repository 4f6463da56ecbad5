"""The submit ring: wrap-around, full ring, order across processes."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import random

import pytest

from lightllm_async.ipc import Op, RegionSpec
from lightllm_async.ipc.ring import SubmitRing


def _ring(capacity: int) -> SubmitRing:
    buf = mmap.mmap(-1, SubmitRing.nbytes(capacity))
    return SubmitRing(buf, 0, capacity)


def _record(i: int) -> tuple[int, int, Op]:
    return i % 997, i, Op.SUBMIT if i % 3 else Op.ABORT


def test_ring_wraps_many_times_in_order():
    ring, rng = _ring(8), random.Random(1)
    pushed = popped = 0
    while popped < 5000:
        for _ in range(rng.randint(0, 11)):
            ok = ring.push(*_record(pushed))
            assert ok == (pushed - popped < 8)  # refused exactly when full
            pushed += ok
        got = ring.pop_all(limit=rng.randint(0, 9))
        assert [tuple(r) for r in got] == [_record(i) for i in range(popped, popped + len(got))]
        popped += len(got)
        assert ring.pending() == pushed - popped


def test_full_ring_refuses_without_overwriting():
    ring = _ring(4)
    assert all(ring.push(*_record(i)) for i in range(4))
    assert not ring.push(*_record(99))
    assert [tuple(r) for r in ring.pop_all()] == [_record(i) for i in range(4)]
    assert ring.pop_all() == []
    assert ring.push(*_record(4))
    assert [tuple(r) for r in ring.pop_all()] == [_record(4)]


def test_ring_rejects_bad_capacity():
    with pytest.raises(ValueError):
        SubmitRing(bytearray(1024), 0, 6)
    with pytest.raises(ValueError):
        RegionSpec(num_slots=4, max_tokens_per_slot=16, ring_capacity=8)  # < 3 * num_slots
    assert RegionSpec(5, 16).resolved().ring_capacity == 32


def _produce(buf: mmap.mmap, n: int) -> None:
    ring = SubmitRing(buf, 0, 64)
    i = 0
    while i < n:
        if ring.push(*_record(i)):
            i += 1
        else:
            os.sched_yield()
    os._exit(0)


def test_ring_keeps_order_across_processes():
    n = 20000
    buf = mmap.mmap(-1, SubmitRing.nbytes(64))
    child = mp.get_context("fork").Process(target=_produce, args=(buf, n))
    child.start()
    ring, got = SubmitRing(buf, 0, 64), []
    while len(got) < n and (child.is_alive() or ring.pending()):
        batch = ring.pop_all()
        got.extend(tuple(r) for r in batch)
        if not batch:
            os.sched_yield()
    child.join(10)
    assert child.exitcode == 0
    assert got == [_record(i) for i in range(n)]
