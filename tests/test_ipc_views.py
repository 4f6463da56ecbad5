"""Each process gets only its own writers: Region.create hands the frontend a FrontendRegion,
Region.attach hands an engine an EngineRegion, and neither view has the other's writer methods."""

from __future__ import annotations

import os
import uuid

import pytest

from lightllm_async.ipc import EngineRegion, FrontendRegion, Op, Region, RegionSpec, RingRecord, SlotState
from lightllm_async.types import FinishReason, SamplingParams

FRONTEND_METHODS = (
    "alloc_slot", "write_request", "submit", "start_request", "abort", "free_slot", "read_output",
    "poll_outputs", "poll_output", "read_tokens", "read_finish", "read_queue_time", "wait_frontend",
    "start_wake_relay",
    "stop_wake_relay", "set_frontend_busy", "owner",
)  # fmt: skip
ENGINE_METHODS = (
    "drain_ring", "read_request", "set_running", "append_tokens", "append_step", "set_cached_tokens",
    "set_scheduled",
    "finish", "is_aborted", "wait_engine", "notify_frontend", "set_engine_state", "set_engine_stats",
    "beat",
)  # fmt: skip
SHARED = (
    "name", "spec", "control", "num_free_slots", "engine_state", "engine_pid", "error_text",
    "heartbeat", "engine_stats", "owner_pid", "close", "unlink", "__enter__", "__exit__",
    "num_replicas", "replica_state", "replica_pid", "replica_error", "replica_heartbeat", "heartbeats",
    "replica_stats",
)  # fmt: skip


@pytest.fixture
def views():
    """(frontend view, engine view) of one region."""
    front = Region.create(
        f"v{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(num_slots=2, max_tokens_per_slot=16)
    )
    engine = Region.attach(front.name)
    yield front, engine
    engine.close()
    front.close()
    front.unlink()


def test_create_gives_the_frontend_view_and_attach_the_engine_view(views):
    front, engine = views
    assert type(front) is FrontendRegion and type(engine) is EngineRegion
    for view in (front, engine):
        assert all(hasattr(view, name) for name in SHARED), [n for n in SHARED if not hasattr(view, n)]


def test_engine_view_cannot_call_a_frontend_writer(views):
    front, engine = views
    assert all(hasattr(front, name) for name in FRONTEND_METHODS)
    assert [name for name in FRONTEND_METHODS if hasattr(engine, name)] == []
    assert not any(hasattr(EngineRegion, name) for name in FRONTEND_METHODS)  # not even on the class
    slot, gen = front.alloc_slot()
    front.write_request(slot, [1, 2], SamplingParams(max_new_tokens=2))
    with pytest.raises(AttributeError):
        engine.submit(slot, gen)
    with pytest.raises(AttributeError):
        engine.free_slot(slot, gen)
    with pytest.raises(AttributeError):
        engine.abort(slot, gen)
    assert front.control(slot) == (SlotState.WRITING, gen)  # untouched


def test_frontend_view_cannot_call_an_engine_writer(views):
    front, engine = views
    assert all(hasattr(engine, name) for name in ENGINE_METHODS)
    assert [name for name in ENGINE_METHODS if hasattr(front, name)] == []
    assert not any(hasattr(FrontendRegion, name) for name in ENGINE_METHODS)
    slot, gen = front.start_request([1, 2], SamplingParams(max_new_tokens=2))
    with pytest.raises(AttributeError):
        front.set_running(slot)
    with pytest.raises(AttributeError):
        front.append_tokens(slot, [5])
    with pytest.raises(AttributeError):
        front.finish(slot, FinishReason.STOP)
    with pytest.raises(AttributeError):
        front.drain_ring()
    assert front.control(slot) == (SlotState.QUEUED, gen)  # untouched
    assert engine.drain_ring() == [RingRecord(slot, gen, Op.SUBMIT)]


def test_slot_life_cycle_with_one_view_per_side(views):
    front, engine = views

    def both(slot: int) -> tuple[SlotState, int]:
        seen = front.control(slot)
        assert engine.control(slot) == seen  # both views map the same slot table
        return seen

    params = SamplingParams(max_new_tokens=3, logprobs=True)
    for round_ in range(2):  # the second round reuses the slot under the next generation
        slot, gen = front.alloc_slot()
        assert both(slot) == (SlotState.WRITING, gen) and gen == round_
        front.write_request(slot, [7, 8, 9], params)
        front.submit(slot, gen)
        assert both(slot) == (SlotState.QUEUED, gen)
        (rec,) = engine.drain_ring()
        req = engine.read_request(rec.slot, rec.gen)
        assert (rec.slot, rec.gen, req.prompt_ids, req.params) == (slot, gen, [7, 8, 9], params)
        assert engine.set_running(slot) and both(slot) == (SlotState.RUNNING, gen)
        engine.append_step([slot], [40 + round_], [-0.5])
        engine.append_tokens(slot, [41, 42], [-1.0, -1.5])
        engine.notify_frontend()
        assert front.wait_frontend(5.0)
        assert front.poll_output(slot) == (SlotState.RUNNING, gen, 3)
        assert engine.finish(slot, FinishReason.LENGTH) and both(slot) == (SlotState.FINISHED, gen)
        out = front.read_output(slot)
        assert (out.tokens, out.logprobs, out.finish_reason) == ([40 + round_, 41, 42], [-0.5, -1.0, -1.5], 2)
        assert front.free_slot(slot, gen) and both(slot) == (SlotState.FREE, gen + 1)
        assert engine.read_request(slot, gen) is None  # the engine's old reference is stale now
    assert front.num_free_slots() == engine.num_free_slots() == 2
