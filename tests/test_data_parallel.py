"""--dp N: N engine replicas behind one frontend and one region.

The region: each replica has its own submit ring, semaphore and header section, and an engine
view attached as replica k sees only those. The frontend: the least-outstanding-work chooser.
The server (`--model dummy`): requests spread over the replicas and all complete; a replica's
death fails its own requests only, then the server exits 1 without leaving shared memory; a
replica that cannot start ends the start with exit 1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import uuid

import pytest

from lightllm_async.ipc import EngineState, EngineStats, Op, Region, RegionSpec, RingRecord
from lightllm_async.ipc.shm import SHM_DIR
from lightllm_async.types import FinishReason, SamplingParams

PARAMS = SamplingParams(max_new_tokens=4)


def _uid() -> str:
    return f"dp{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _shm_files(name: str) -> list[str]:
    base = name.lstrip("/")
    return sorted(f for f in os.listdir(SHM_DIR) if f == base or f.startswith(f"sem.{base}-"))


@pytest.fixture
def three():
    """(frontend view, [engine view of replica 0, 1, 2]) of a region with three replicas."""
    front = Region.create(_uid(), RegionSpec(num_slots=7, max_tokens_per_slot=16, num_replicas=3))
    engines = [Region.attach(front.name, replica=k) for k in range(3)]
    yield front, engines
    for e in engines:
        e.close()
    front.close()
    front.unlink()


# ---------------------------------------------------------------- the region


def test_an_engine_attached_as_replica_k_drains_only_what_was_queued_on_k(three):
    front, engines = three
    a = front.start_request([1, 2], PARAMS, replica=2)
    b = front.start_request([3], PARAMS, replica=0)
    c = front.start_request([4, 5, 6], PARAMS, replica=2)
    assert [front.owner(s) for s, _ in (a, b, c)] == [2, 0, 2]
    assert engines[1].drain_ring() == []
    assert engines[2].drain_ring() == [RingRecord(*a, Op.SUBMIT), RingRecord(*c, Op.SUBMIT)]
    assert engines[0].drain_ring() == [RingRecord(*b, Op.SUBMIT)]
    # an abort goes to the ring of the replica that runs the request, and to no other
    assert engines[2].set_running(c[0])
    assert front.abort(*c) and front.abort(*b)
    assert engines[2].drain_ring() == [RingRecord(*c, Op.ABORT)]
    assert engines[0].drain_ring() == [RingRecord(*b, Op.ABORT)]
    assert engines[1].drain_ring() == []
    # the slot table is shared: every view sees replica 2's output of slot c
    engines[2].append_tokens(c[0], [9])
    assert engines[2].finish(c[0], FinishReason.ABORT)
    assert front.read_output(c[0]).tokens == [9] and engines[0].control(c[0]) == engines[2].control(c[0])


def test_a_freed_slot_may_go_to_another_replica_under_its_next_generation(three):
    front, engines = three
    slot, gen = front.start_request([1], PARAMS, replica=1)
    assert engines[1].drain_ring() == [RingRecord(slot, gen, Op.SUBMIT)]
    assert engines[1].set_running(slot) and engines[1].finish(slot, FinishReason.STOP)
    assert front.free_slot(slot, gen)
    while (ref := front.alloc_slot()) != (slot, gen + 1):
        assert ref is not None
    front.write_request(slot, [2, 3], PARAMS)
    front.submit(slot, gen + 1, replica=0)
    assert front.owner(slot) == 0
    assert engines[0].drain_ring() == [RingRecord(slot, gen + 1, Op.SUBMIT)]
    assert engines[1].drain_ring() == []
    assert engines[1].read_request(slot, gen) is None  # replica 1's old reference is stale


def test_each_replica_writes_only_its_own_section_and_the_frontend_adds_them_up(three):
    front, engines = three
    assert front.num_replicas == 3 and [e.replica for e in engines] == [0, 1, 2]
    engines[1].set_engine_state(EngineState.READY)
    engines[1].beat()
    engines[1].set_engine_stats(EngineStats(num_running=2, kv_tokens_total=100, generation_tokens_total=7))
    engines[2].set_engine_stats(EngineStats(num_running=3, kv_tokens_total=50, generation_tokens_total=1))
    assert [front.replica_state(k) for k in range(3)] == [EngineState.STARTING, EngineState.READY, 0]
    assert front.heartbeats() == (0, 1, 0) and engines[1].heartbeat == 1 and engines[0].heartbeat == 0
    assert front.engine_state == EngineState.STARTING  # READY only once every replica is
    assert engines[1].engine_state == EngineState.READY  # an engine's view: its own
    assert engines[1].engine_stats().num_running == 2 and engines[0].engine_stats() == EngineStats()
    total = front.engine_stats()
    assert (total.num_running, total.kv_tokens_total, total.generation_tokens_total) == (5, 150, 8)
    engines[0].set_engine_state(EngineState.READY)
    engines[2].set_engine_state(EngineState.READY)
    assert front.engine_state == EngineState.READY
    engines[2].set_engine_state(EngineState.ERROR, "CUDA error: an illegal memory access")
    assert front.engine_state == EngineState.ERROR
    assert front.error_text == "replica 2: CUDA error: an illegal memory access"
    assert engines[2].error_text == "CUDA error: an illegal memory access" and engines[1].error_text == ""
    assert front.replica_pid(2) == os.getpid() and front.replica_pid(0) == os.getpid()


def test_a_submit_wakes_the_sleeping_replica_it_was_queued_on_and_no_other(three):
    front, engines = three
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(engines[1].wait_engine(10.0, spin=0)))
    waiter.start()
    time.sleep(0.2)  # asleep on its semaphore, idle flag set
    started = time.monotonic()
    front.start_request([1], PARAMS, replica=1)
    waiter.join(5)
    assert woke == [True] and time.monotonic() - started < 1.0
    assert [e._sem_engine.value for e in engines] == [0, 0, 0]  # the post was taken by replica 1
    assert engines[0].drain_ring() == [] and len(engines[1].drain_ring()) == 1


def test_a_step_of_any_replica_moves_the_readers_notify_count(three):
    front, engines = three
    seq = front.set_frontend_busy(True)
    engines[2].notify_frontend()  # busy reader: counted, not posted
    assert front.set_frontend_busy(False) == seq + 1
    assert not front.wait_frontend(0.0)
    engines[0].notify_frontend()  # idle reader: posted
    assert front.wait_frontend(1.0)


def test_replica_semaphores_are_private_and_removed_with_the_region():
    front = Region.create(_uid(), RegionSpec(num_slots=2, max_tokens_per_slot=8, num_replicas=3))
    base = front.name.lstrip("/")
    expected = sorted([base, f"sem.{base}-ew", f"sem.{base}-ew1", f"sem.{base}-ew2", f"sem.{base}-fw"])
    assert _shm_files(front.name) == expected
    assert all(os.stat(os.path.join(SHM_DIR, f)).st_mode & 0o777 == 0o600 for f in expected)
    with pytest.raises(IndexError):
        Region.attach(front.name, replica=3)
    front.close()
    front.unlink()
    assert _shm_files(front.name) == []


def _create_and_die(instance_id: str) -> None:
    Region.create(instance_id, RegionSpec(num_slots=2, max_tokens_per_slot=8, num_replicas=4))
    os._exit(0)  # no atexit, no unlink: a crashed server


def test_the_next_start_removes_every_replica_semaphore_of_a_dead_owner():
    dead = _uid()
    child = mp.get_context("fork").Process(target=_create_and_die, args=(dead,))
    child.start()
    child.join(10)
    assert len(_shm_files(f"/lla-{dead}")) == 6  # the region, 4 engine semaphores, the frontend's
    fresh = Region.create(_uid(), RegionSpec(2, 8))
    try:
        assert _shm_files(f"/lla-{dead}") == []
    finally:
        fresh.close()
        fresh.unlink()
