"""The slot state machine against a model, under every interleaving hypothesis finds.

Both sides' calls on one region (frontend: alloc, write, submit, abort, free; engine: drain,
start, step, finish) are rules; the model tracks each slot's state, generation, request, output
and abort flag, the free stack's order and the ring's pending records. After every rule the
region must agree with the model through every reader: control, poll_outputs, read_output,
read_tokens, read_finish, num_free_slots, is_aborted and the ring.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lightllm_async.ipc import Op, Region, RegionSpec, SlotState, engine_side
from lightllm_async.types import FinishReason, SamplingParams

NUM_SLOTS, ARENA = 3, 8
FREE, WRITING, QUEUED, RUNNING, FINISHED, _HANDOFF = SlotState  # HANDOFF: test_pd


@dataclass
class SlotModel:
    state: SlotState = FREE
    gen: int = 0
    written: bool = False
    prompt: list[int] = field(default_factory=list)
    max_new: int = 0
    top_k: int = 0
    stops: tuple[int, ...] = ()
    out: list[int] = field(default_factory=list)
    aborted: bool = False
    reason: FinishReason = FinishReason.NONE


class _Just:
    """Stands in for hypothesis' `data` in a rule called from another rule: draws one value."""

    def __init__(self, value: int) -> None:
        self.value = value

    def draw(self, strategy) -> int:
        return self.value


class SlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.front = Region.create(f"sm{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(NUM_SLOTS, ARENA))
        self.engine = Region.attach(self.front.name)
        self.slots = [SlotModel() for _ in range(NUM_SLOTS)]
        self.stack = list(range(NUM_SLOTS - 1, -1, -1))  # free stack, top at the end
        self.ring: list[tuple[int, int, Op]] = []  # records pushed, not drained yet
        self.stale: list[tuple[int, int]] = []  # references whose slot was freed

    def teardown(self) -> None:
        self.engine.close()
        self.front.close()
        self.front.unlink()

    def _in(self, *states: SlotState) -> list[int]:
        return [i for i, m in enumerate(self.slots) if m.state in states]

    def _freed(self, slot: int) -> None:
        m = self.slots[slot]
        self.stale.append((slot, m.gen))
        self.slots[slot] = SlotModel(gen=m.gen + 1)
        self.stack.append(slot)

    # ---- frontend ----

    @rule()
    def alloc(self) -> None:
        ref = self.front.alloc_slot()
        if not self.stack:
            assert ref is None
            return
        slot = self.stack.pop()
        assert ref == (slot, self.slots[slot].gen)
        self.slots[slot].state = WRITING

    @precondition(lambda self: self._in(WRITING))
    @rule(
        data=st.data(),
        prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=ARENA),
        max_new=st.integers(1, 12),
        stops=st.lists(st.integers(0, 99), max_size=3),
    )
    def write(self, data, prompt, max_new, stops) -> None:
        slot = data.draw(st.sampled_from(self._in(WRITING)))
        params = SamplingParams(max_new_tokens=max_new, top_k=max_new, stop_ids=tuple(stops))
        if len(prompt) >= ARENA:
            with pytest.raises(ValueError):
                self.front.write_request(slot, prompt, params)
            return
        self.front.write_request(slot, prompt, params)
        m = self.slots[slot]
        m.written, m.prompt, m.aborted = True, prompt, False
        m.max_new, m.top_k, m.stops = min(max_new, ARENA - len(prompt)), max_new, tuple(stops)

    @precondition(lambda self: any(m.written for m in self.slots if m.state == WRITING))
    @rule(data=st.data())
    def submit(self, data) -> None:
        slot = data.draw(st.sampled_from([i for i in self._in(WRITING) if self.slots[i].written]))
        m = self.slots[slot]
        self.front.submit(slot, m.gen)
        m.state = QUEUED
        self.ring.append((slot, m.gen, Op.SUBMIT))

    @precondition(lambda self: self._in(WRITING, QUEUED, RUNNING, FINISHED))
    @rule(data=st.data())
    def abort(self, data) -> None:
        slot = data.draw(st.sampled_from(self._in(WRITING, QUEUED, RUNNING, FINISHED)))
        m = self.slots[slot]
        assert self.front.abort(slot, m.gen) is True
        if not m.aborted and m.state in (QUEUED, RUNNING):
            self.ring.append((slot, m.gen, Op.ABORT))
        m.aborted = True

    @precondition(lambda self: self._in(WRITING, FINISHED))
    @rule(data=st.data())
    def free(self, data) -> None:
        slot = data.draw(st.sampled_from(self._in(WRITING, FINISHED)))
        assert self.front.free_slot(slot, self.slots[slot].gen) is True
        self._freed(slot)

    @precondition(lambda self: self._in(FINISHED))
    @rule(data=st.data(), prompt=st.lists(st.integers(0, 99), min_size=1, max_size=ARENA - 1))
    def recycle(self, data, prompt) -> None:
        """Free a finished slot and run the next request in it (the reuse path, in one rule)."""
        self.drain()
        slot = data.draw(st.sampled_from(self._in(FINISHED)))
        self.free(data=_Just(slot))
        self.alloc()
        assert self.slots[slot].state == WRITING  # LIFO: the slot just freed comes back first
        self.write(data=_Just(slot), prompt=prompt, max_new=ARENA, stops=[])
        self.submit(data=_Just(slot))
        self.drain()
        self.start(data=_Just(slot))

    @precondition(lambda self: self._in(QUEUED, RUNNING))
    @rule(data=st.data())
    def free_is_refused_while_the_engine_owns_it(self, data) -> None:
        slot = data.draw(st.sampled_from(self._in(QUEUED, RUNNING)))
        with pytest.raises(RuntimeError):
            self.front.free_slot(slot, self.slots[slot].gen)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def stale_references_touch_nothing(self, data) -> None:
        slot, gen = data.draw(st.sampled_from(self.stale))
        assert self.front.abort(slot, gen) is False
        assert self.front.free_slot(slot, gen) is False
        assert self.engine.read_request(slot, gen) is None
        with pytest.raises(ValueError):
            self.front.submit(slot, gen)

    # ---- engine ----

    @rule()
    def drain(self) -> None:
        assert [tuple(r) for r in self.engine.drain_ring()] == self.ring
        self.ring = []

    @precondition(lambda self: self._in(QUEUED))
    @rule(data=st.data())
    def start(self, data) -> None:
        slot = data.draw(st.sampled_from(self._in(QUEUED)))
        m = self.slots[slot]
        view = self.engine.read_request(slot, m.gen)
        assert (view.prompt_ids, view.params.max_new_tokens) == (m.prompt, m.max_new)
        assert (view.params.stop_ids, view.params.top_k) == (m.stops, m.top_k)
        assert self.engine.set_running(slot)
        m.state, m.out = RUNNING, []

    @precondition(lambda self: self._in(RUNNING))
    @rule(data=st.data())
    def step(self, data) -> None:
        running = self._in(RUNNING)
        chosen = data.draw(
            st.one_of(st.permutations(running), st.lists(st.sampled_from(running), min_size=1, unique=True))
        )
        if not chosen:
            return
        tokens = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=len(chosen), max_size=len(chosen)))
        if any(len(self.slots[s].prompt) + len(self.slots[s].out) >= ARENA for s in chosen):
            with pytest.raises(ValueError):
                self.engine.append_step(chosen, tokens)
            return
        self.engine.append_step(chosen, tokens)
        for slot, token in zip(chosen, tokens, strict=True):
            self.slots[slot].out.append(token)

    @precondition(lambda self: self._in(QUEUED, RUNNING))
    @rule(data=st.data(), reason=st.sampled_from(list(FinishReason)[1:]))
    def finish(self, data, reason) -> None:
        slot = data.draw(st.sampled_from(self._in(QUEUED, RUNNING)))
        assert self.engine.finish(slot, reason)
        m = self.slots[slot]
        if m.state == QUEUED:  # rejected before it ran: no output
            m.out = []
        m.state, m.reason = FINISHED, reason

    @rule(slot=st.integers(0, NUM_SLOTS - 1))
    def engine_moves_only_its_own_states(self, slot) -> None:
        m = self.slots[slot]
        if m.state != QUEUED:
            assert self.engine.set_running(slot) is False
        if m.state not in (QUEUED, RUNNING):
            assert self.engine.finish(slot, FinishReason.ERROR) is False

    # ---- everything the region shows ----

    @invariant()
    def region_agrees_with_the_model(self) -> None:
        front, slots = self.front, self.slots
        assert [front.control(i) for i in range(NUM_SLOTS)] == [(m.state, m.gen) for m in slots]
        states, gens, counts = front.poll_outputs(np.arange(NUM_SLOTS, dtype=np.int64))
        assert states.tolist() == [m.state for m in slots] and gens.tolist() == [m.gen for m in slots]
        for i, m in enumerate(slots):
            if m.state in (RUNNING, FINISHED):
                assert counts[i] == len(m.out) and front.read_tokens(i, 0, len(m.out)) == m.out
                out = front.read_output(i)
                assert (out.tokens, out.finished) == (m.out, m.state == FINISHED)
            if m.state == FINISHED:
                assert out.finish_reason == m.reason and front.read_finish(i) == (m.reason, 0)
            if m.state in (QUEUED, RUNNING, FINISHED):
                assert self.engine.is_aborted(i) == m.aborted
        assert front.num_free_slots() == len(self.stack)
        assert self.engine._ring.pending() == len(self.ring)


class VectorizedStepMachine(SlotMachine):
    """The same with append_step's numpy path for every step (small steps go slot by slot)."""

    def __init__(self) -> None:
        super().__init__()
        self._small, engine_side._SMALL_STEP = engine_side._SMALL_STEP, 0

    def teardown(self) -> None:
        engine_side._SMALL_STEP = self._small
        super().teardown()


_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None)
SlotMachine.TestCase.settings = _SETTINGS
VectorizedStepMachine.TestCase.settings = _SETTINGS
test_slot_state_machine_matches_its_model = SlotMachine.TestCase
test_slot_state_machine_with_vectorized_steps = VectorizedStepMachine.TestCase
