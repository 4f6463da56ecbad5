"""The engine's view of a region: drain the ring, read requests, publish tokens, finish.

A view belongs to one engine replica (`Region.attach(name, replica=k)`). That replica's rank 0 is
the single consumer of its submit ring, the single writer of its EngineSection, and the single
writer of the engine fields of the slots submitted to it, while it runs them.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import astuple

import numpy as np
import posix_ipc

from lightllm_async.ipc import atomics
from lightllm_async.ipc.extras import SlotExt
from lightllm_async.ipc.layout import (
    ABORT,
    ENGINE_IDLE,
    ENGINE_STATE,
    ERROR_TEXT_BYTES,
    FRONTEND_BUSY,
    HEARTBEAT,
    NOTIFY_SEQ,
    NUM_OUTPUT,
    PROMPT_LEN,
    REQUEST_FIELDS,
    SLOT_SIZE,
    STATS_SEQ,
    Layout,
)
from lightllm_async.ipc.ring import SubmitRing
from lightllm_async.ipc.steps import StepChannel
from lightllm_async.ipc.types import (
    EngineState,
    EngineStats,
    HandoffView,
    RequestView,
    RingRecord,
    SlotState,
)
from lightllm_async.ipc.view import RegionView
from lightllm_async.types import FinishReason, SamplingParams

# An idle engine busy-waits this long on the ring before it sleeps on its semaphore: a request
# that comes soon after the last one then costs no wake-up of a sleeping process (~30 us here).
ENGINE_SPIN_S = 0.001
_SMALL_STEP = 4  # append_step writes steps of at most this many slots one slot at a time


def _as_list(values: Sequence) -> Sequence:
    return values.tolist() if isinstance(values, np.ndarray) else values


@functools.lru_cache(maxsize=4096)
def _params(fields: tuple, extras: tuple) -> SamplingParams:
    """SamplingParams from a slot's packed fields and its extras; requests mostly repeat a few
    parameter sets, and building the frozen dataclass costs more than this lookup. Raises
    InvalidParam for a slot whose fields no frontend could have written (the engine then fails
    that request alone)."""
    (max_new, temperature, top_p, min_p, presence, frequency, repetition, seed, top_k,
     num_stop, ignore_eos, logprobs, has_seed, *stops) = fields  # fmt: skip
    min_tokens, top_logprobs, prompt_logprobs, logit_bias = extras
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed if has_seed else None, ignore_eos=bool(ignore_eos), stop_ids=tuple(stops[:num_stop]),
        logprobs=bool(logprobs), min_p=min_p, presence_penalty=presence, frequency_penalty=frequency,
        repetition_penalty=repetition, min_tokens=min_tokens, logit_bias=logit_bias,
        top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


class EngineRegion(RegionView):
    """One engine replica's view of a region (from `Region.attach(name, replica)`): the header
    reads of RegionView and the engine's writers, bound to the replica's own submit ring,
    semaphore and EngineSection. The frontend's writers are not here: a FrontendRegion has them."""

    def __init__(
        self,
        name: str,
        mm: mmap.mmap,
        layout: Layout,
        sems: tuple[posix_ipc.Semaphore, posix_ipc.Semaphore],
        replica: int = 0,
    ) -> None:
        super().__init__(name, mm, layout, sems)
        self.replica = replica
        self._sem_engine, self._sem_frontend = sems
        self._ring = SubmitRing(mm, layout.replica_ring_off(replica), layout.spec.ring_capacity)
        self._section = self._engines[replica]
        base = layout.engine_off(replica)
        self._state_off, self._idle_off = base + ENGINE_STATE, base + ENGINE_IDLE
        self._heartbeat_off, self._notify_off = base + HEARTBEAT, base + NOTIFY_SEQ
        self._stats_seq_off = base + STATS_SEQ

    def step_channel(self, group: int = 0) -> StepChannel:
        """Engine group `group`'s tensor-parallel step channel (steps.py): its rank 0 writes it,
        its ranks 1..N-1 read it."""
        spec = self._layout.spec
        return StepChannel.at(
            self._mm, self._layout.step_channel_off(group), spec.step_followers, spec.step_record
        )

    def drain_ring(self, limit: int = 0) -> list[RingRecord]:
        """Every record submitted since the last drain (at most `limit` if > 0), oldest first."""
        return self._ring.pop_all(limit)

    def read_request(self, slot: int, gen: int) -> RequestView | None:
        """The request in (slot, gen); None if the reference is stale or the slot is not
        QUEUED/RUNNING. The acquire load of the state pairs with submit()'s CAS."""
        state, cur = self.control(slot)
        if cur != gen or state not in (SlotState.QUEUED, SlotState.RUNNING):
            return None
        plen, *fields = REQUEST_FIELDS.unpack_from(self._mm, self._layout.slot_off(slot) + PROMPT_LEN)
        params = _params(tuple(fields), self._extras.read(self._mm, slot))
        prompt = self._tokens[slot, :plen].tolist()
        return RequestView(slot, gen, prompt, params, float(self._submit_times[slot]))

    def handoff_target(self, slot: int) -> int:
        """--pd: the decode replica the frontend chose for the request in this slot (-1: none);
        a frontend field published by submit's CAS."""
        return int(self._slots[self._check(slot)].handoff_to)

    def hand_off(self, slot: int, seq: int, source: int | None = None) -> bool:
        """--pd, the prefill replica, after publishing the first token: record itself (`source`,
        its group rank; default its replica index) and the transfer number, then RUNNING ->
        HANDOFF (the CAS publishes them). The slot's engine fields pass to the decode replica the
        frontend relays it to. False if not RUNNING."""
        state, gen = self.control(slot)
        if state != SlotState.RUNNING:
            return False
        s = self._slots[slot]
        s.handoff_from, s.handoff_seq = self.replica if source is None else source, seq
        return self._move(slot, gen, SlotState.RUNNING, SlotState.HANDOFF)

    def resumed_from(self, slot: int) -> int:
        """--role decode: the group rank of the prefill engine that handed off the request queued
        in this slot (-1: an ordinary request); a frontend field published by submit's CAS."""
        return int(self._slots[self._check(slot)].resume_from)

    def take_over(self, slot: int, gen: int) -> bool:
        """--role decode: QUEUED -> HANDOFF for a request another server's prefill engine handed
        off (`resumed_from` >= 0), with the engine fields set as that engine would have left them:
        the output count the frontend wrote, the source, the transfer number and cached_tokens.
        From then on the slot goes as an in-host handoff (read_handoff, resume). False if stale
        or not QUEUED."""
        state, cur = self.control(slot)
        if (state, cur) != (SlotState.QUEUED, gen):
            return False
        self._reset_engine_fields(slot)
        s = self._slots[slot]
        s.handoff_from, s.handoff_seq = s.resume_from, s.resume_seq
        s.cached_tokens, s.num_output = s.resume_cached, s.resume_outputs
        s.first_token_time = time.monotonic()
        return self._move(slot, gen, SlotState.QUEUED, SlotState.HANDOFF)

    def read_handoff(self, slot: int, gen: int) -> HandoffView | None:
        """--pd, the decode replica: the handed-off request in (slot, gen), with its output so
        far and where its KV comes from; None if stale or not in HANDOFF."""
        state, cur = self.control(slot)
        if cur != gen or state != SlotState.HANDOFF:
            return None
        plen, *fields = REQUEST_FIELDS.unpack_from(self._mm, self._layout.slot_off(slot) + PROMPT_LEN)
        params = _params(tuple(fields), self._extras.read(self._mm, slot))
        s = self._slots[slot]
        tokens = self._tokens[slot, : plen + s.num_output].tolist()
        prompt, output = tokens[:plen], tokens[plen:]
        return HandoffView(
            slot, gen, prompt, params, output,
            int(s.handoff_from), int(s.handoff_seq), int(s.cached_tokens),
        )  # fmt: skip

    def resume(self, slot: int) -> bool:
        """--pd, the decode replica: HANDOFF -> RUNNING, keeping the engine fields (the first
        tokens, times, cached_tokens) the prefill replica wrote. False if not in HANDOFF."""
        state, gen = self.control(slot)
        return state == SlotState.HANDOFF and self._move(slot, gen, SlotState.HANDOFF, SlotState.RUNNING)

    def set_running(self, slot: int) -> bool:
        """QUEUED -> RUNNING, resetting the engine section first (the CAS publishes the reset, so
        the frontend never sees the previous request's output). False if the slot is not QUEUED."""
        state, gen = self.control(slot)
        if state != SlotState.QUEUED:
            return False
        self._reset_engine_fields(slot)
        return self._move(slot, gen, SlotState.QUEUED, SlotState.RUNNING)

    def append_tokens(
        self, slot: int, token_ids: Sequence[int], logprobs: Sequence[float] | None = None
    ) -> int:
        """Write output tokens (and logprobs), then release-store the new count. Returns the count.
        ValueError if the slot's arena is full (the engine stops at max_new_tokens before that)."""
        s = self._slots[self._check(slot)]
        n, plen, k = s.num_output, s.prompt_len, len(token_ids)
        if k == 0:
            return n
        if plen + n + k > self._layout.spec.max_tokens_per_slot:
            raise ValueError(f"slot {slot}: {plen}+{n}+{k} tokens exceed max_tokens_per_slot")
        self._tokens[slot, plen + n : plen + n + k] = token_ids
        if logprobs is not None:
            self._logprobs[slot, n : n + k] = logprobs
        if n == 0:
            s.first_token_time = time.monotonic()
        atomics.store_release_u32(self._mm, self._field_off(slot, NUM_OUTPUT), n + k)
        return n + k

    def append_step(
        self, slots: Sequence[int], token_ids: Sequence[int], logprobs: Sequence[float] | None = None
    ) -> None:
        """One output token for each of `slots` (distinct), as a decode step makes them: write every
        token (and logprob), then release-store every new count, in one call each. ValueError,
        with nothing written, if a slot's arena is full."""
        if len(slots) <= _SMALL_STEP:  # numpy's per-call cost outweighs its loop here
            slots, token_ids = _as_list(slots), _as_list(token_ids)  # numpy scalars are slow
            if len(token_ids) != len(slots):
                raise ValueError(f"{len(token_ids)} tokens for {len(slots)} slots")
            if len(slots) == 1:  # append_tokens checks, then writes
                self.append_tokens(slots[0], token_ids, None if logprobs is None else _as_list(logprobs))
                return
            room = self._layout.spec.max_tokens_per_slot
            for slot in slots:  # every check before the first write
                if self._prompt_lens[self._check(slot)] + self._num_outputs[slot] >= room:
                    raise ValueError(f"slot {slot}: output would exceed max_tokens_per_slot")
            for k, slot in enumerate(slots):
                self.append_tokens(slot, (token_ids[k],), None if logprobs is None else (logprobs[k],))
            return
        idx = self._check_many(slots)
        n = self._num_outputs[idx]  # our own field: a plain read
        pos = self._prompt_lens[idx] + n  # fixed while we own the slot (published by submit's CAS)
        if int(pos.max()) >= self._layout.spec.max_tokens_per_slot:
            bad = int(idx[pos.argmax()])
            raise ValueError(f"slot {bad}: output would exceed max_tokens_per_slot")
        self._tokens[idx, pos] = token_ids
        if logprobs is not None:
            self._logprobs[idx, n] = logprobs
        if not n.all():  # some slot's first token
            self._first_token_times[idx[n == 0]] = time.monotonic()
        atomics.scatter_release_u32(self._mm, self._num_output_base, SLOT_SIZE, idx, n + 1)

    def logprob_limit(self, slot: int) -> int:
        """Positions below this may be written into the slot's log-probability ring now: the
        reader has copied out every entry R positions back (acquire of its lp_read)."""
        ext = self._extras
        read = atomics.load_acquire_u32(self._mm, ext.field_off(slot, ext.lp_read_base))
        return read + self.spec.logprob_ring

    def put_logprobs(
        self,
        slots: Sequence[int],
        positions: Sequence[int],
        chosen: np.ndarray,
        top_ids: np.ndarray,
        top_logprobs: np.ndarray,
    ) -> None:
        """Log-probabilities of the tokens at `positions` of `slots` (a slot's rows in ascending,
        consecutive positions): chosen [L], top_ids / top_logprobs [L, k]. Rows of positions
        already published (a recomputation) are skipped; the rest are written, then each slot's
        end is release-stored. ValueError, with nothing written, for a row that would leave a
        gap or overwrite an entry the reader has not copied (logprob_limit)."""
        if not len(slots):
            return
        ext, ring = self._extras, self.spec.logprob_ring
        slots, pos = self._check_many(slots), np.asarray(positions, np.int64)
        keep = pos >= ext.lp_end[slots]  # our own field: a plain read
        slots, pos = slots[keep], pos[keep]
        if not len(slots):
            return
        last = np.flatnonzero(np.r_[slots[1:] != slots[:-1], True])  # each slot's last row
        first = np.r_[0, last[:-1] + 1]
        ends, limits = pos[last] + 1, np.empty(len(last), np.uint32)
        atomics.gather_acquire_u32(self._mm, ext.lp_read_base, ctypes.sizeof(SlotExt), slots[last], limits)
        if (pos[first] != ext.lp_end[slots[first]]).any() or (ends > limits.astype(np.int64) + ring).any():
            bad = slots[last].tolist()
            raise ValueError(f"log-probabilities of slots {bad} out of order or past the ring")
        idx, k = pos % ring, top_ids.shape[1]
        ext.lp_chosen[slots, idx] = np.asarray(chosen)[keep]
        ext.lp_ids[slots, idx, :k] = np.asarray(top_ids)[keep]
        ext.lp_vals[slots, idx, :k] = np.asarray(top_logprobs)[keep]
        atomics.scatter_release_u32(
            self._mm, ext.lp_end_base, ctypes.sizeof(SlotExt), slots[last], ends.astype(np.uint32)
        )

    def set_scheduled(self, slot: int) -> None:
        """The request was admitted to the running batch for the first time, now (monotonic: the
        same clock as the frontend's submit_time); published by the next append or finish."""
        self._slots[self._check(slot)].scheduled_time = time.monotonic()

    def set_cached_tokens(self, slot: int, n: int) -> None:
        """Prefix-cache hit length; published by the next append_tokens or finish."""
        self._slots[self._check(slot)].cached_tokens = n

    def finish(self, slot: int, reason: FinishReason) -> bool:
        """RUNNING (or QUEUED, for a request rejected before it ran; or HANDOFF, for a handed-off
        request the decode replica ends before resuming it) -> FINISHED. The CAS publishes
        finish_reason, finish_time and the final count. False if the slot is in none of them."""
        state, gen = self.control(slot)
        if state == SlotState.QUEUED:
            self._reset_engine_fields(slot)
        elif state not in (SlotState.RUNNING, SlotState.HANDOFF):
            return False
        s = self._slots[slot]
        s.finish_reason = int(reason)
        s.finish_time = time.monotonic()
        return self._move(slot, gen, state, SlotState.FINISHED)

    def is_aborted(self, slot: int) -> bool:
        return atomics.load_acquire_u32(self._mm, self._field_off(slot, ABORT)) != 0

    def wait_engine(self, timeout: float | None, spin: float = ENGINE_SPIN_S) -> bool:
        """Wait until the frontend submits or aborts something, or `timeout` passes. True if there
        are records to drain (or a wake-up came). Busy-waits on the ring for `spin` seconds first,
        then sleeps on the semaphore with the idle flag set, so that the frontend posts only while
        the engine sleeps, re-checking the ring after setting it (see FrontendRegion._wake_engine)."""
        if self._ring.pending():
            return True
        if spin > 0 and self._ring.spin_until_pending(int(spin * 1e9)):
            return True
        atomics.store_release_u32(self._mm, self._idle_off, 1)
        atomics.fence_seq_cst()
        if self._ring.pending():
            atomics.store_release_u32(self._mm, self._idle_off, 0)
            return True
        try:
            self._sem_engine.acquire(timeout)
            woke = True
        except (posix_ipc.BusyError, posix_ipc.SignalError):  # timed out, or a signal (SIGTERM: stop)
            woke = False
        atomics.store_release_u32(self._mm, self._idle_off, 0)
        self._drain(self._sem_engine)
        return woke or self._ring.pending() > 0

    def notify_frontend(self) -> None:
        """Once per step, after publishing that step's tokens: count the step in notify_seq, then
        post the frontend's semaphore unless its reader is busy reading the slots (it then checks
        notify_seq after clearing its flag and reads again if it moved). Dekker pair with
        FrontendRegion.set_frontend_busy: notify_seq stored, fence, flag loaded here; flag stored,
        fence, notify_seq loaded there. One of the two sees the other's store."""
        atomics.fetch_add_u64(self._mm, self._notify_off, 1)  # after the step's release stores
        atomics.fence_seq_cst()  # the flag load below stays after that store
        if not atomics.load_acquire_u32(self._mm, FRONTEND_BUSY):
            self._sem_frontend.release()

    # ---- header: this replica's section (state, error text, stats, heartbeat) ----

    def set_engine_state(self, state: EngineState, error: str = "") -> None:
        """Record this process as the replica's engine and publish its state; the release store of
        the state publishes engine_pid and the error text written before it."""
        data = error.encode()[:ERROR_TEXT_BYTES].decode(errors="ignore").encode()
        sec = self._section
        sec.engine_pid = os.getpid()
        sec.error_text = data
        sec.error_len = len(data)
        atomics.store_release_u32(self._mm, self._state_off, int(state))

    def set_engine_stats(self, stats: EngineStats) -> None:
        """Publish a snapshot (seqlock: odd count, fence, values, release-store of the even count)."""
        seq = self._section.stats_seq  # our own field
        atomics.store_release_u64(self._mm, self._stats_seq_off, seq + 1)
        atomics.fence_seq_cst()  # the value stores below stay after the odd count
        self._section.stats[:] = astuple(stats)
        atomics.store_release_u64(self._mm, self._stats_seq_off, seq + 2)

    def beat(self) -> None:
        """Count one engine step (the frontend can tell a hung engine from a busy one)."""
        atomics.fetch_add_u64(self._mm, self._heartbeat_off, 1)

    def _release_views(self) -> None:
        self._section = None  # type: ignore[assignment]
        super()._release_views()

    def _reset_engine_fields(self, slot: int) -> None:
        s = self._slots[slot]
        s.num_output = s.finish_reason = s.cached_tokens = 0
        s.first_token_time = s.finish_time = s.scheduled_time = 0.0
        self._extras.table[slot].lp_end = self._extras.table[slot].lp_read  # the first position
