"""The frontend's view of a region: allocate, write, submit, abort, read, free.

The frontend is the single producer of every replica's submit ring: call these from one process
(any of its threads). alloc_slot/free_slot alone are safe from any number of processes.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import posix_ipc

from lightllm_async.ipc import atomics
from lightllm_async.ipc.layout import (
    ABORT,
    CONTROL,
    ENGINE_IDLE,
    FRONTEND_BUSY,
    MAGIC,
    MAGIC_OFF,
    NOTIFY_SEQ,
    NUM_OUTPUT,
    PROMPT_LEN,
    REQUEST_FIELDS,
    SLOT_SIZE,
    Layout,
)
from lightllm_async.ipc.ring import SubmitRing
from lightllm_async.ipc.shm import frontend_sem_name
from lightllm_async.ipc.types import Op, OutputView, SlotState
from lightllm_async.ipc.view import RegionView
from lightllm_async.types import MAX_STOP_IDS, FinishReason, SamplingParams

_U32 = 0xFFFFFFFF
_NO_STOPS = (0,) * MAX_STOP_IDS


class FrontendRegion(RegionView):
    """The frontend's view of a region (from `Region.create`): the header reads of RegionView and
    the frontend's writers. The engine's writers are not here: an EngineRegion has them.

    With several engine replicas, `submit(..., replica=k)` queues a slot on replica k's ring; the
    view remembers the owner of each slot it queued (`owner(slot)`), so that an abort reaches the
    replica that runs the request.
    """

    def __init__(self, name: str, mm: mmap.mmap, layout: Layout, sems: Sequence[posix_ipc.Semaphore]) -> None:
        super().__init__(name, mm, layout, sems)
        replicas = range(layout.spec.num_replicas)
        *self._sem_engines, self._sem_frontend = sems  # by replica, then the frontend's
        cap = layout.spec.ring_capacity
        self._rings = [SubmitRing(mm, layout.replica_ring_off(k), cap) for k in replicas]
        self._ring_locks = [threading.Lock() for _ in replicas]  # one producer: this process's threads
        self._idle_offs = [layout.engine_off(k) + ENGINE_IDLE for k in replicas]
        self._notify_offs = [layout.engine_off(k) + NOTIFY_SEQ for k in replicas]
        self._owners = [0] * layout.spec.num_slots  # the replica each slot was last queued on
        self._relays: list = []  # wake relays started here; close() stops those left running

    def _init_contents(self, owner_pid: int) -> None:
        """Lay out a new region; the release store of the magic publishes it to attach()."""
        self._layout.write_header(self._header, owner_pid)
        atomics.slot_stack_init(self._mm, self._layout.stack_off, self.spec.num_slots)
        atomics.store_release_u64(self._mm, MAGIC_OFF, MAGIC)

    def close(self) -> None:
        for relay in list(self._relays):  # each holds an export of the mapping
            self.stop_wake_relay(relay)
        super().close()

    def alloc_slot(self) -> tuple[int, int] | None:
        """Take a free slot, FREE -> WRITING. Returns (slot, generation), or None if none is free."""
        slot = atomics.slot_stack_pop(self._mm, self._layout.stack_off)
        if slot < 0:
            return None
        state, gen = self.control(slot)
        if state != SlotState.FREE or not self._move(slot, gen, SlotState.FREE, SlotState.WRITING):
            raise RuntimeError(f"slot {slot} came off the free stack in state {state.name}")
        return slot, gen

    def write_request(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Fill a WRITING slot. The prompt must leave room for one output token; max_new_tokens is
        clamped to the room left. Published to the engine by submit()."""
        state, _ = self.control(slot)
        if state != SlotState.WRITING:
            raise ValueError(f"slot {slot} is {state.name}, not WRITING")
        self._write(slot, prompt_ids, params)

    def submit(self, slot: int, gen: int, replica: int = 0) -> None:
        """WRITING -> QUEUED (the CAS publishes the request), then a SUBMIT record on `replica`'s
        ring, then a wake-up of that replica."""
        state, cur = self.control(slot)
        if (state, cur) != (SlotState.WRITING, gen):
            raise ValueError(f"slot {slot} gen {gen} is not being written (now {state.name}, gen {cur})")
        self._queue(slot, gen, replica)

    def start_request(
        self, prompt_ids: Sequence[int], params: SamplingParams, replica: int = 0, handoff_to: int = -1
    ) -> tuple[int, int] | None:
        """alloc_slot, write_request and submit (to `replica`) in one call: (slot, gen), or None
        if no slot is free. On an error the slot is freed again (the engine never saw it).
        `handoff_to` (--pd): the decode replica the prefill replica `replica` hands the request to."""
        ref = self.alloc_slot()
        if ref is None:
            return None
        try:
            self._write(ref[0], prompt_ids, params)
            self._slots[ref[0]].handoff_to = handoff_to
            self._queue(*ref, replica)
        except BaseException:
            self.free_slot(*ref)
            raise
        return ref

    def start_resumed(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        output_ids: Sequence[int],
        source: int,
        seq: int,
        cached_tokens: int,
        replica: int = 0,
    ) -> tuple[int, int] | None:
        """--role decode: a request that prefill engine `source` (a group rank, on another server)
        computed and handed off as its transfer `seq` to this server's engine, which takes it over
        as if a local prefill replica had: (slot, gen), or None if no slot is free. `output_ids`
        (at least one) are the tokens made so far; the engine goes on after them. ValueError if
        they and the prompt leave no room for another token."""
        n, k, room = len(prompt_ids), len(output_ids), self._layout.spec.max_tokens_per_slot
        if k < 1 or n + k >= room:
            raise ValueError(f"{n} prompt and {k} output tokens leave no room in a slot of {room}")
        ref = self.alloc_slot()
        if ref is None:
            return None
        slot = ref[0]
        try:
            self._write(slot, prompt_ids, params)
            self._tokens[slot, n : n + k] = output_ids
            self._extras.table[slot].lp_read = n + k  # the engine reports positions after these
            s = self._slots[slot]
            s.resume_from, s.resume_outputs, s.resume_cached, s.resume_seq = source, k, cached_tokens, seq
            self._queue(*ref, replica)
        except BaseException:
            self.free_slot(*ref)
            raise
        return ref

    def release_handoff(self, slot: int, gen: int) -> bool:
        """--role prefill: the engine handed (slot, gen) off to a decode engine of another server
        (the frontend passed on what that one needs): HANDOFF -> FREE, as free_slot does from
        FINISHED. False for a stale reference or a slot not in HANDOFF."""
        state, cur = self.control(slot)
        if (state, cur) != (SlotState.HANDOFF, gen) or not self._move(
            slot, gen, SlotState.HANDOFF, SlotState.FREE, new_gen=gen + 1
        ):
            return False
        atomics.slot_stack_push(self._mm, self._layout.stack_off, slot)
        return True

    def read_handed_off(self, slot: int) -> tuple[int, int, int]:
        """(source, seq, cached_tokens) of a slot seen in HANDOFF by an acquire load."""
        s = self._slots[slot]
        return int(s.handoff_from), int(s.handoff_seq), int(s.cached_tokens)

    def _write(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        n, room = len(prompt_ids), self._layout.spec.max_tokens_per_slot
        if not 0 < n < room:
            raise ValueError(f"prompt of {n} tokens does not fit a slot of {room} tokens")
        p, stops = params, params.stop_ids
        max_new = room - n if p.max_new_tokens is None else min(p.max_new_tokens, room - n)
        off = self._layout.slot_off(slot)
        REQUEST_FIELDS.pack_into(
            self._mm, off + PROMPT_LEN, n, max_new,
            p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty, p.seed or 0, p.top_k, len(stops), p.ignore_eos, p.logprobs,
            p.seed is not None, *stops, *_NO_STOPS[len(stops):],
        )  # fmt: skip
        atomics.store_release_u32(self._mm, off + ABORT, 0)  # ours while WRITING; submit publishes
        self._slots[slot].handoff_to = self._slots[slot].resume_from = -1
        self._tokens[slot, :n] = prompt_ids
        self._extras.write(
            self._mm, slot, p.min_tokens, p.top_logprobs, p.prompt_logprobs, p.logit_bias,
            p.first_logprob_position(n),
        )  # fmt: skip

    def _queue(self, slot: int, gen: int, replica: int) -> None:
        if not 0 <= replica < len(self._rings):
            raise IndexError(f"replica {replica} out of range [0, {len(self._rings)})")
        self._submit_times[slot] = time.monotonic()
        if not self._move(slot, gen, SlotState.WRITING, SlotState.QUEUED):
            raise RuntimeError(f"slot {slot} changed state during submit")
        self._owners[slot] = replica  # before the record: an abort may follow at once
        if not self._push(slot, gen, Op.SUBMIT):
            # the engine never saw it: it is still ours to take back
            self._move(slot, gen, SlotState.QUEUED, SlotState.WRITING)
            raise RuntimeError("submit ring full")

    def relay_handoff(self, slot: int, gen: int, replica: int) -> bool:
        """--pd: (slot, gen) is in HANDOFF (its prefill replica computed the prompt): a HANDOFF
        record on decode replica `replica`'s ring, which owns the slot from now on (an abort goes
        there). False, with nothing done, if the reference is stale or the slot not in HANDOFF."""
        state, cur = self.control(slot)
        if (state, cur) != (SlotState.HANDOFF, gen):
            return False
        self._owners[slot] = replica
        if not self._push(slot, gen, Op.HANDOFF):
            raise RuntimeError("submit ring full")
        return True

    def owner(self, slot: int) -> int:
        """The replica that slot was last queued on (0 for a slot never queued)."""
        return self._owners[self._check(slot)]

    def abort(self, slot: int, gen: int) -> bool:
        """Ask the engine to stop (slot, gen). False if that reference is stale or already freed.
        The ABORT record goes to the ring of the replica the slot was queued on.

        The flag (release-stored) is the truth; the ABORT record only gets the engine's attention.
        Idempotent: only the first call per generation pushes a record.
        """
        state, cur = self.control(slot)
        if cur != gen or state == SlotState.FREE:
            return False
        off = self._field_off(slot, ABORT)
        if atomics.load_acquire_u32(self._mm, off):
            return True
        atomics.store_release_u32(self._mm, off, 1)
        # HANDOFF too (--pd): the decode replica it was relayed to may resume it at any moment, having
        # looked at the flag just before we set it; a replica that does not hold it ignores the record
        if state in (SlotState.QUEUED, SlotState.RUNNING, SlotState.HANDOFF):
            self._push(slot, gen, Op.ABORT)
        return True

    def read_output(self, slot: int, start: int = 0) -> OutputView:
        """Output tokens [start, num_tokens) and the engine's fields. Reads the state (acquire),
        then num_output (acquire, pairs with append_tokens' release), then the tokens."""
        state, _ = self.control(slot)
        s = self._slots[slot]
        plen = s.prompt_len
        if state not in (SlotState.RUNNING, SlotState.FINISHED, SlotState.HANDOFF):
            return OutputView([], 0, False, FinishReason.NONE, 0, None, plen, s.submit_time)
        n = atomics.load_acquire_u32(self._mm, self._field_off(slot, NUM_OUTPUT))
        start = min(max(start, 0), n)
        tokens = self._tokens[slot, plen + start : plen + n].tolist()
        logprobs = self._logprobs[slot, start:n].tolist() if s.logprobs else None
        done = state == SlotState.FINISHED
        return OutputView(
            tokens, n, done, FinishReason(s.finish_reason) if done else FinishReason.NONE,
            s.cached_tokens, logprobs, plen, s.submit_time, s.first_token_time,
            s.finish_time if done else 0.0,
        )  # fmt: skip

    # ---- many slots at once: the reader's path (one call per wake-up, not one per slot) ----

    def poll_outputs(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(states, generations, output counts) of `slots` (int64 array), each read with acquire:
        every control word first, then every num_output. A count is only meaningful for a RUNNING
        or FINISHED slot; for a FINISHED one it is final (the -> FINISHED CAS published it)."""
        slots = self._check_many(slots)
        words = np.empty(len(slots), np.uint64)
        counts = np.empty(len(slots), np.uint32)
        atomics.gather_acquire_u64(self._mm, self._control_base, SLOT_SIZE, slots, words)
        atomics.gather_acquire_u32(self._mm, self._num_output_base, SLOT_SIZE, slots, counts)
        return words & _U32, words >> 32, counts

    def poll_output(self, slot: int) -> tuple[int, int, int]:
        """poll_outputs for one slot, as plain ints: (state, generation, output count)."""
        word = atomics.load_acquire_u64(self._mm, self._field_off(slot, CONTROL))
        return word & _U32, word >> 32, atomics.load_acquire_u32(self._mm, self._field_off(slot, NUM_OUTPUT))

    def read_tokens(self, slot: int, start: int, stop: int) -> list[int]:
        """Output tokens [start, stop) of a slot, for stop <= a count read with acquire."""
        base = self._prompt_lens[slot]  # our own field
        return self._tokens[slot, base + start : base + stop].tolist()

    def logprob_end(self, slot: int) -> int:
        """Positions below this have log-probabilities in the ring (acquire: their entries are
        visible after it). Read after the output count, it covers every token counted."""
        return atomics.load_acquire_u32(self._mm, self._extras.field_off(slot, self._extras.lp_end_base))

    def read_logprobs(self, slot: int, start: int, stop: int, k: int) -> tuple[np.ndarray, ...]:
        """Copies of the ring entries of positions [start, stop), for stop <= a logprob_end read
        with acquire and start >= what set_logprob_read last released: chosen [m] float32, the
        k most likely ids [m, k] int32 and their logprobs [m, k] float32."""
        if not 0 <= stop - start <= self.spec.logprob_ring:
            raise ValueError(f"positions [{start}, {stop}) do not fit a ring of {self.spec.logprob_ring}")
        return self._extras.copy_logprobs(slot, start, stop, k)

    def set_logprob_read(self, slot: int, position: int) -> None:
        """The reader copied every entry below `position`: the engine may reuse their places."""
        atomics.store_release_u32(self._mm, self._extras.field_off(slot, self._extras.lp_read_base), position)

    def read_finish(self, slot: int) -> tuple[FinishReason, int]:
        """(finish_reason, cached_tokens) of a slot seen FINISHED by an acquire load."""
        s = self._slots[slot]
        return FinishReason(s.finish_reason), s.cached_tokens

    def read_queue_time(self, slot: int) -> float | None:
        """Seconds from submit to the first admission to the running batch, of a slot seen
        FINISHED by an acquire load; None if it was never admitted (aborted while waiting)."""
        s = self._slots[slot]
        return s.scheduled_time - s.submit_time if s.scheduled_time else None

    def free_slot(self, slot: int, gen: int) -> bool:
        """FINISHED (or WRITING) -> FREE with the generation bumped, then back on the free stack.

        False (no-op) for a stale generation or a slot already freed; RuntimeError while the
        engine owns the slot (QUEUED, RUNNING): abort it and wait for FINISHED first.
        """
        state, cur = self.control(slot)
        if cur != gen or state == SlotState.FREE:
            return False
        if state not in (SlotState.WRITING, SlotState.FINISHED):
            raise RuntimeError(f"slot {slot} is {state.name}: the engine still owns it")
        if not self._move(slot, gen, state, SlotState.FREE, new_gen=gen + 1):
            return False
        atomics.slot_stack_push(self._mm, self._layout.stack_off, slot)
        return True

    # ---- wake-ups from the engine ----

    def wait_frontend(self, timeout: float | None) -> bool:
        """Block until the engine posts (True) or `timeout` seconds pass (False). After a True,
        read every active slot; posts made before that read are absorbed."""
        try:
            self._sem_frontend.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        self._drain(self._sem_frontend)
        return True

    def start_wake_relay(self, fd: int) -> Any:
        """Start the helper thread that waits on the frontend semaphore and, after each post (surplus
        posts absorbed), sets the frontend_busy flag and adds 1 to the eventfd `fd`. An asyncio loop
        watches `fd` with add_reader; on each wake-up it reads `fd`, reads every active slot, then
        clears the flag as set_frontend_busy says. The compiled relay never takes the GIL."""
        relay = atomics.relay_start(frontend_sem_name(self.name), fd, self._mm, FRONTEND_BUSY)
        self._relays.append(relay)
        return relay

    def set_frontend_busy(self, busy: bool) -> int:
        """The reader's flag; returns the sum of the replicas' notify_seq, loaded after the flag is
        stored. Set it before reading the slots: the engines then only count their steps instead
        of posting. After clearing it, read the slots once more if the sum moved since the value
        setting it returned: a step published before an engine could see the flag cleared is read
        there, a later one is posted (see EngineRegion.notify_frontend). Each count only grows,
        so the sum moves when any of them does."""
        atomics.store_release_u32(self._mm, FRONTEND_BUSY, int(busy))
        if not busy:
            atomics.fence_seq_cst()
        offs = self._notify_offs
        if len(offs) == 1:
            return atomics.load_acquire_u64(self._mm, offs[0])
        return sum(atomics.load_acquire_u64(self._mm, off) for off in offs)

    def stop_wake_relay(self, relay: Any) -> None:
        """Stop and join the relay (idempotent; close() stops those still running)."""
        atomics.relay_stop(relay)
        if relay in self._relays:
            self._relays.remove(relay)

    # ---- the submit rings and the engines' wake-ups ----

    def _push(self, slot: int, gen: int, op: Op) -> bool:
        """A record on the ring of the slot's owner, then a wake-up of that replica."""
        replica = self._owners[slot]
        with self._ring_locks[replica]:
            ok = self._rings[replica].push(slot, gen, op)
        self._wake_engine(replica)
        return ok

    def _wake_engine(self, replica: int) -> None:
        # Dekker pair with wait_engine: ring tail stored, fence, idle flag loaded here; idle flag
        # stored, fence, ring tail loaded there. One of the two sees the other's store.
        atomics.fence_seq_cst()
        if atomics.load_acquire_u32(self._mm, self._idle_offs[replica]):
            self._sem_engines[replica].release()
