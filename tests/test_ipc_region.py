"""Region life cycle (names, modes, stale cleanup) and the request protocol between the two sides."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import time
import uuid
from dataclasses import astuple

import pytest

from lightllm_async.ipc import (
    EngineState,
    EngineStats,
    FinishReason,
    Op,
    Region,
    RegionSpec,
    RequestParams,
    RingRecord,
    SlotState,
)
from lightllm_async.ipc.shm import SHM_DIR

PARAMS = RequestParams(
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
    """(frontend, engine): the creator and a second mapping attached by name."""
    front = Region.create(_uid(), RegionSpec(num_slots=3, max_tokens_per_slot=32))
    engine = Region.attach(front.name)
    yield front, engine
    engine.close()
    front.close()
    front.unlink()


def _submit(front: Region, prompt: list[int]) -> tuple[int, int]:
    slot, gen = front.alloc_slot()
    front.write_request(slot, prompt, PARAMS)
    front.submit(slot, gen)
    return slot, gen


def _run_to_end(engine: Region, slot: int, tokens: list[int], reason=FinishReason.STOP) -> None:
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
    assert front.free_slot(slot, gen) and front.num_free_slots() == 3


def test_max_new_tokens_is_clamped_to_the_arena_and_prompts_must_fit(pair):
    front, engine = pair
    slot, gen = front.alloc_slot()
    with pytest.raises(ValueError):
        front.write_request(slot, list(range(32)), PARAMS)  # no room for an output token
    front.write_request(slot, list(range(30)), RequestParams(max_new_tokens=100))
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
        engine.set_engine_stats(EngineStats(*([i] * 8)))
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
