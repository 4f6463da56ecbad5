"""The mapped views of a region that both views build on, and the slot-state CAS."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import posix_ipc

from lightllm_async.ipc import atomics
from lightllm_async.ipc.extras import Extras
from lightllm_async.ipc.layout import (
    CONTROL,
    FIRST_TOKEN_TIME,
    NUM_OUTPUT,
    PROMPT_LEN,
    SLOT_SIZE,
    SUBMIT_TIME,
    EngineSection,
    Header,
    Layout,
    Slot,
)
from lightllm_async.ipc.types import RegionSpec, SlotState

_U32 = 0xFFFFFFFF
STATES = tuple(SlotState)  # STATES[word & 0xFFFFFFFF]: cheaper than SlotState(...) on hot paths


def pack_control(state: SlotState, gen: int) -> int:
    return (gen & _U32) << 32 | int(state)


class RegionCore:
    """Views over one mapped region: header, engine sections, slot table, token arenas, and the
    semaphores this process opened (`sems`: the subclass knows which; closed with the view). The
    submit rings are the subclasses': a frontend has every replica's, an engine its own."""

    def __init__(self, name: str, mm: mmap.mmap, layout: Layout, sems: Sequence[posix_ipc.Semaphore]) -> None:
        n, t = layout.spec.num_slots, layout.spec.max_tokens_per_slot
        self.name = name
        self._mm = mm
        self._layout = layout
        self._sems = list(sems)
        self._header = Header.from_buffer(mm, 0)
        # every replica's header section, by replica
        self._engines = [
            EngineSection.from_buffer(mm, layout.engine_off(k)) for k in range(layout.spec.num_replicas)
        ]
        self._slots = (Slot * n).from_buffer(mm, layout.slots_off)
        # [num_slots, max_tokens_per_slot]: prompt ids, then output ids
        self._tokens = np.frombuffer(mm, np.int32, n * t, layout.tokens_off).reshape(n, t)
        # [num_slots, max_tokens_per_slot]: logprob of output token i at [slot, i]
        self._logprobs = np.frombuffer(mm, np.float32, n * t, layout.logprobs_off).reshape(n, t)
        # [num_slots] views of one field of every slot (stride: one slot). Plain numpy access is for
        # fields the caller writes itself or reads after an acquire that published them; the
        # atomics' gather/scatter use the offsets below for the acquire/release ones.
        self._prompt_lens = self._field_view(PROMPT_LEN, np.uint32)
        self._submit_times = self._field_view(SUBMIT_TIME, np.float64)
        self._num_outputs = self._field_view(NUM_OUTPUT, np.uint32)
        self._first_token_times = self._field_view(FIRST_TOKEN_TIME, np.float64)
        self._control_base = layout.slots_off + CONTROL
        self._num_output_base = layout.slots_off + NUM_OUTPUT
        self._extras = Extras(mm, layout.extras)  # sampling extras and the log-probability ring
        self._last_stats: dict = {}  # each replica's last consistent stats snapshot read here

    def _field_view(self, field_offset: int, dtype: type) -> np.ndarray:
        n = self._layout.spec.num_slots
        off = self._layout.slots_off + field_offset
        return np.ndarray((n,), dtype, buffer=self._mm, offset=off, strides=(SLOT_SIZE,))

    @property
    def spec(self) -> RegionSpec:
        return self._layout.spec

    def _check(self, slot: int) -> int:
        if not 0 <= slot < self._layout.spec.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self._layout.spec.num_slots})")
        return slot

    def _check_many(self, slots: np.ndarray) -> np.ndarray:
        """`slots` as int64, IndexError unless all are slots (the atomics only check the mapping)."""
        slots = np.asarray(slots, dtype=np.int64)
        # one reduction checks both ends: a negative index is huge as uint64
        if slots.size and int(slots.view(np.uint64).max()) >= self._layout.spec.num_slots:
            raise IndexError(f"slots out of range [0, {self._layout.spec.num_slots})")
        return slots

    def _field_off(self, slot: int, field_offset: int) -> int:
        return self._layout.slot_off(self._check(slot)) + field_offset

    def control(self, slot: int) -> tuple[SlotState, int]:
        """(state, generation) of a slot, read with acquire: the data published with the state
        (request fields for QUEUED, final output for FINISHED) is visible after this."""
        word = atomics.load_acquire_u64(self._mm, self._field_off(slot, CONTROL))
        return STATES[word & _U32], word >> 32

    def _move(self, slot: int, gen: int, old: SlotState, new: SlotState, new_gen: int | None = None) -> bool:
        """CAS (old, gen) -> (new, new_gen or gen). Sequentially consistent: it publishes every
        field the caller wrote before it and fails if the state or the generation moved on."""
        off = self._field_off(slot, CONTROL)
        desired = pack_control(new, gen if new_gen is None else new_gen)
        return atomics.cas_u64(self._mm, off, pack_control(old, gen), desired)

    def _drain(self, sem: posix_ipc.Semaphore) -> None:
        """Take surplus posts: the caller is about to look at everything they announced."""
        while sem.value > 0:  # cheaper than a failing acquire(0) in the usual case of none
            try:
                sem.acquire(0)
            except posix_ipc.BusyError:
                return

    def _release_views(self) -> None:
        """Drop every export of the mapping, so that mmap.close() succeeds."""
        self._header = self._slots = self._tokens = self._logprobs = self._extras = None  # type: ignore[assignment]
        self._engines = []
        self._prompt_lens = self._submit_times = self._num_outputs = self._first_token_times = None  # type: ignore[assignment]
