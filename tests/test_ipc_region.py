"""Region life cycle (names, modes, stale cleanup) and the request protocol between the two sides."""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import stat
import threading
import time
import uuid
from dataclasses import astuple

import numpy as np
import pytest

from lightllm_async.ipc import (
    EngineRegion,
    EngineState,
    EngineStats,
    FrontendRegion,
    Op,
    Region,
    RegionSpec,
    RingRecord,
    SlotState,
    engine_side,
)
from lightllm_async.ipc.shm import SHM_DIR
from lightllm_async.ipc.types import ENGINE_STATS_FIELDS
from lightllm_async.types import FinishReason, SamplingParams

PARAMS = SamplingParams(
    max_new_tokens=5,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=1234,
    ignore_eos=True,
    stop_ids=(2, 17, 99),
    logprobs=True,
    min_p=0.05,
)


def _uid() -> str:
    return f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _files(name: str) -> list[str]:
    base = name.lstrip("/")
    return [os.path.join(SHM_DIR, f) for f in (base, f"sem.{base}-ew", f"sem.{base}-fw")]


@pytest.fixture
def pair():
    """(frontend, engine): the creator's view and an engine view attached by name."""
    front = Region.create(_uid(), RegionSpec(num_slots=3, max_tokens_per_slot=32))
    engine = Region.attach(front.name)
    yield front, engine
    engine.close()
    front.close()
    front.unlink()


def _submit(front: FrontendRegion, prompt: list[int]) -> tuple[int, int]:
    slot, gen = front.alloc_slot()
    front.write_request(slot, prompt, PARAMS)
    front.submit(slot, gen)
    return slot, gen


def _run_to_end(engine: EngineRegion, slot: int, tokens: list[int], reason=FinishReason.STOP) -> None:
    assert engine.set_running(slot)
    engine.append_tokens(slot, tokens)
    assert engine.finish(slot, reason)


# ---- names, modes, cleanup ----


def test_region_and_semaphores_are_private_0600(pair):
    front, _ = pair
    for path in _files(front.name):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_unlink_removes_memory_and_both_semaphores():
    region = Region.create(_uid(), RegionSpec(2, 8))
    assert all(os.path.exists(p) for p in _files(region.name))
    region.unlink()
    region.close()
    region.close()  # idempotent
    assert not any(os.path.exists(p) for p in _files(region.name))
    with pytest.raises(FileNotFoundError):
        Region.attach(region.name)


def _create_and_die(instance_id: str) -> None:
    Region.create(instance_id, RegionSpec(2, 8))
    os._exit(0)  # no atexit, no unlink: a crashed server


def test_create_removes_regions_of_dead_owners():
    dead_id, live = _uid(), Region.create(_uid(), RegionSpec(2, 8))
    child = mp.get_context("fork").Process(target=_create_and_die, args=(dead_id,))
    child.start()
    child.join(10)
    dead = _files(f"/lla-{dead_id}")
    assert all(os.path.exists(p) for p in dead)
    fresh = Region.create(_uid(), RegionSpec(2, 8))
    try:
        assert not any(os.path.exists(p) for p in dead)
        assert all(os.path.exists(p) for p in _files(live.name))  # its owner (us) is alive
    finally:
        for r in (fresh, live):
            r.close()
            r.unlink()


def test_create_refuses_a_live_name(pair):
    front, _ = pair
    with pytest.raises(FileExistsError):
        Region.create(front.name.removeprefix("/lla-"), RegionSpec(2, 8))


# ---- requests ----


def test_request_reaches_engine_and_output_comes_back(pair):
    front, engine = pair
    slot, gen = _submit(front, [5, 6, 7])
    assert engine.drain_ring() == [RingRecord(slot, gen, Op.SUBMIT)]
    req = engine.read_request(slot, gen)
    assert req.prompt_ids == [5, 6, 7] and req.params == PARAMS and req.submit_time > 0
    assert engine.set_running(slot)
    engine.set_cached_tokens(slot, 2)
    engine.append_tokens(slot, [11, 12], [-0.25, -1.5])
    out = front.read_output(slot, 1)
    assert (out.tokens, out.num_tokens, out.finished, out.logprobs) == ([12], 2, False, [-1.5])
    assert out.cached_tokens == 2 and out.first_token_time >= req.submit_time
    assert engine.finish(slot, FinishReason.LENGTH)
    out = front.read_output(slot)
    assert (out.tokens, out.finished, out.finish_reason) == ([11, 12], True, FinishReason.LENGTH)
    assert front.read_queue_time(slot) is None  # the engine never admitted it to a batch
    assert front.free_slot(slot, gen) and front.num_free_slots() == 3


def test_queue_time_runs_from_submit_to_the_first_admission(pair):
    front, engine = pair
    slot, gen = _submit(front, [5, 6, 7])
    engine.drain_ring()
    submitted = engine.read_request(slot, gen).submit_time
    assert engine.set_running(slot)
    engine.set_scheduled(slot)
    assert engine.finish(slot, FinishReason.ABORT)
    queued = front.read_queue_time(slot)
    assert 0 <= queued < time.monotonic() - submitted


def test_max_new_tokens_is_clamped_to_the_arena_and_prompts_must_fit(pair):
    front, engine = pair
    slot, gen = front.alloc_slot()
    with pytest.raises(ValueError):
        front.write_request(slot, list(range(32)), PARAMS)  # no room for an output token
    front.write_request(slot, list(range(30)), SamplingParams(max_new_tokens=100))
    front.submit(slot, gen)
    assert engine.read_request(slot, gen).params.max_new_tokens == 2
    assert engine.set_running(slot)
    with pytest.raises(ValueError):
        engine.append_tokens(slot, [1, 2, 3])
    assert front.read_output(slot).num_tokens == 0


def test_stale_generation_is_rejected(pair):
    front, engine = pair
    slot, gen = _submit(front, [1, 2])
    engine.drain_ring()
    _run_to_end(engine, slot, [3])
    assert front.free_slot(slot, gen)
    assert engine.read_request(slot, gen) is None
    assert front.abort(slot, gen) is False
    assert front.free_slot(slot, gen) is False  # double free is a no-op
    with pytest.raises(ValueError):
        front.submit(slot, gen)
    # the slot comes back with the next generation; the old reference cannot touch it
    refs = [front.alloc_slot() for _ in range(3)]
    assert (slot, gen + 1) in refs
    assert front.abort(slot, gen) is False and not engine.is_aborted(slot)
    assert front.free_slot(slot, gen) is False
    assert front.control(slot) == (SlotState.WRITING, gen + 1)


def test_reused_slot_shows_none_of_the_previous_output(pair):
    front, engine = pair
    slot, gen = _submit(front, [1, 2])
    _run_to_end(engine, slot, [7, 8, 9])
    front.free_slot(slot, gen)
    while (ref := front.alloc_slot()) != (slot, gen + 1):
        assert ref is not None
    front.write_request(slot, [4], PARAMS)
    front.submit(slot, gen + 1)
    assert front.read_output(slot).num_tokens == 0  # QUEUED: nothing to read yet
    assert engine.set_running(slot)
    out = front.read_output(slot)
    assert (out.num_tokens, out.tokens, out.finish_reason, out.first_token_time) == (0, [], 0, 0.0)


def test_free_is_refused_while_the_engine_owns_the_slot(pair):
    front, engine = pair
    slot, gen = _submit(front, [1])
    with pytest.raises(RuntimeError):
        front.free_slot(slot, gen)
    engine.set_running(slot)
    with pytest.raises(RuntimeError):
        front.free_slot(slot, gen)
    assert engine.finish(slot, FinishReason.ABORT)
    assert front.free_slot(slot, gen)


def test_abort_sets_the_flag_once_and_queues_one_record(pair):
    front, engine = pair
    slot, gen = _submit(front, [1])
    assert front.abort(slot, gen) and front.abort(slot, gen)
    assert engine.is_aborted(slot)
    assert [r.op for r in engine.drain_ring()] == [Op.SUBMIT, Op.ABORT]
    assert engine.finish(slot, FinishReason.ABORT)  # rejected while QUEUED
    assert front.read_output(slot).finish_reason == FinishReason.ABORT
    assert front.free_slot(slot, gen)
    slot2, gen2 = front.alloc_slot()
    front.write_request(slot2, [1], PARAMS)
    assert not engine.is_aborted(slot2)  # the flag is reset for the next request


def test_engine_state_error_text_and_heartbeat(pair):
    front, engine = pair
    assert front.engine_state == EngineState.STARTING and front.error_text == ""
    engine.set_engine_state(EngineState.READY)
    engine.beat()
    engine.beat()
    assert (front.engine_state, front.engine_pid, front.heartbeat) == (EngineState.READY, os.getpid(), 2)
    engine.set_engine_state(EngineState.ERROR, "CUDA out of memory ü" + "x" * 5000)
    assert front.engine_state == EngineState.ERROR
    assert front.error_text.startswith("CUDA out of memory ü") and len(front.error_text.encode()) <= 1024


# ---- a whole step at once: append_step on the engine side, poll_outputs on the frontend's ----


def _running(front: FrontendRegion, engine: EngineRegion, prompts: list[list[int]]) -> list[tuple[int, int]]:
    refs = [_submit(front, p) for p in prompts]
    engine.drain_ring()
    for slot, _ in refs:
        assert engine.set_running(slot)
    return refs


@pytest.fixture(params=["one_by_one", "vectorized"])
def step_path(request, monkeypatch):
    """append_step writes small steps slot by slot and larger ones with numpy: test both."""
    if request.param == "vectorized":
        monkeypatch.setattr(engine_side, "_SMALL_STEP", 0)


def test_append_step_publishes_a_token_per_slot_that_poll_and_read_tokens_see(pair, step_path):
    front, engine = pair
    refs = _running(front, engine, [[1], [1, 2], [1, 2, 3]])
    slots = [slot for slot, _ in refs]
    engine.append_step(slots, [10, 20, 30], [-0.5, -1.0, -1.5])
    engine.append_step(slots[1:], [21, 31])
    states, gens, counts = front.poll_outputs(np.array(slots, np.int64))
    assert states.tolist() == [SlotState.RUNNING] * 3
    assert gens.tolist() == [gen for _, gen in refs] and counts.tolist() == [1, 2, 2]
    assert [front.read_tokens(s, 0, c) for s, c in zip(slots, counts.tolist(), strict=True)] == [
        [10],
        [20, 21],
        [30, 31],
    ]
    assert front.read_tokens(slots[1], 1, 2) == [21]
    out = front.read_output(slots[0])
    assert out.logprobs == [-0.5] and out.first_token_time >= out.submit_time > 0
    first = front.read_output(slots[1]).first_token_time
    engine.append_step(slots[1:2], [22])
    assert front.read_output(slots[1]).first_token_time == first  # stamped by the first token only
    engine.set_cached_tokens(slots[2], 1)
    assert engine.finish(slots[2], FinishReason.STOP)
    states, _, counts = front.poll_outputs(np.array(slots[::-1], np.int64))
    assert states.tolist()[0] == SlotState.FINISHED and counts.tolist() == [2, 3, 1]
    assert front.read_finish(slots[2]) == (FinishReason.STOP, 1)


def test_append_step_that_would_overflow_an_arena_writes_nothing(pair, step_path):
    front, engine = pair
    (a, _), (b, _) = _running(front, engine, [list(range(1, 31)), [1]])  # a: room for 2 outputs
    engine.append_step([a, b], [5, 6])
    engine.append_step([b, a], [8, 7])
    with pytest.raises(ValueError):
        engine.append_step([b, a], [10, 9])
    assert front.read_output(a).tokens == [5, 7] and front.read_output(b).tokens == [6, 8]
    engine.append_step([], [])  # an empty step is a no-op
    with pytest.raises(ValueError):
        engine.append_step([b], [11, 12])  # one token per slot
    assert front.read_output(b).tokens == [6, 8]


def test_poll_reports_the_state_and_generation_of_any_slot(pair):
    front, engine = pair
    ((running, _),) = _running(front, engine, [[4, 5]])
    queued, _ = _submit(front, [6])
    writing, _ = front.alloc_slot()
    slots = np.array([running, queued, writing], np.int64)
    states, gens, _ = front.poll_outputs(slots)
    assert list(zip(states.tolist(), gens.tolist(), strict=True)) == [
        front.control(s) for s in slots.tolist()
    ]
    with pytest.raises(IndexError):
        front.poll_outputs(np.array([0, 3], np.int64))  # slot 3 does not exist (3 slots)
    with pytest.raises(IndexError):
        engine.append_step([running, -1], [1, 2])
    assert front.read_output(running).num_tokens == 0


def test_idle_engine_spins_on_the_ring_before_it_sleeps(pair):
    front, engine = pair
    timer = threading.Timer(0.02, _submit, (front, [1]))
    timer.start()
    t = time.monotonic()
    assert engine.wait_engine(5.0, spin=2.0)
    assert time.monotonic() - t < 1.5
    timer.join()
    assert engine._sem_engine.value == 0  # it never slept, so the frontend never posted


# ---- wake-ups ----


def test_frontend_posts_the_engine_only_while_it_sleeps(pair):
    front, engine = pair
    _submit(front, [1])
    assert engine._sem_engine.value == 0  # the engine was not idle: no syscall spent
    assert engine.wait_engine(0.0)  # work pending: returns at once
    engine.drain_ring()
    t = time.monotonic()
    assert not engine.wait_engine(0.05)
    assert time.monotonic() - t >= 0.04


def _echo_engine(name: str, n: int) -> None:
    """Engine loop: sleep when idle, answer every submit with one token."""
    engine = Region.attach(name)
    done = 0
    while done < n:
        if not engine.wait_engine(2.0):
            os._exit(3)  # a lost wake-up
        for rec in engine.drain_ring():
            engine.set_running(rec.slot)
            engine.append_tokens(rec.slot, [rec.gen + 100])
            engine.finish(rec.slot, FinishReason.STOP)
            done += 1
        engine.notify_frontend()
    os._exit(0)


def test_engine_and_frontend_wake_each_other_without_loss(pair):
    front, _ = pair
    n = 200
    child = mp.get_context("fork").Process(target=_echo_engine, args=(front.name, n))
    child.start()
    for i in range(n):
        slot, gen = _submit(front, [i + 1])
        if i % 7 == 0:
            time.sleep(0.002)  # let the engine fall asleep now and then
        while not front.read_output(slot).finished:
            assert front.wait_frontend(2.0), f"request {i} not answered"
        assert front.read_output(slot).tokens == [gen + 100]
        front.free_slot(slot, gen)
    child.join(5)
    assert child.exitcode == 0


def _publish_stats(name: str, n: int) -> None:
    engine = Region.attach(name)
    for i in range(1, n + 1):
        engine.set_engine_stats(EngineStats(*([i] * ENGINE_STATS_FIELDS)))
    os._exit(0)


def test_engine_stats_snapshots_are_never_torn(pair):
    front, _ = pair
    assert front.engine_stats() == EngineStats()
    n = 20000
    child = mp.get_context("fork").Process(target=_publish_stats, args=(front.name, n))
    child.start()
    last = 0
    while last < n:
        values = astuple(front.engine_stats())
        assert len(set(values)) == 1 and values[0] >= last, values
        last = values[0]
    child.join(5)
    assert child.exitcode == 0


def test_close_stops_a_wake_relay_left_running():
    front = Region.create(_uid(), RegionSpec(num_slots=2, max_tokens_per_slot=8))
    engine = Region.attach(front.name)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        front.start_wake_relay(efd)
        engine.notify_frontend()
        assert select.select([efd], [], [], 5)[0]  # the relay is running
        front.close()  # no BufferError: the relay was stopped and its export released
    finally:
        engine.close()
        os.close(efd)
        front.unlink()
