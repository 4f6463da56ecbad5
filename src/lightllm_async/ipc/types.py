"""The values that cross the shared-memory boundary, as plain Python objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from enum import IntEnum
from typing import NamedTuple

from lightllm_async.types import FinishReason, SamplingParams


class Op(IntEnum):
    """What a submit-ring record asks of the engine (0 is never written, to catch torn records)."""

    SUBMIT = 1
    ABORT = 2
    HANDOFF = 3  # --pd: a prefill replica handed (slot, gen) over; its KV is on its way (engine/disagg.py)


class SlotState(IntEnum):
    """A slot's life: FREE -> WRITING -> QUEUED (frontend), -> RUNNING -> FINISHED (engine; QUEUED ->
    FINISHED when the engine rejects a request), -> FREE (frontend). WRITING -> FREE when the frontend
    gives up before submitting."""

    FREE = 0
    WRITING = 1
    QUEUED = 2
    RUNNING = 3
    FINISHED = 4
    # --pd: a prefill replica computed the prompt and published the first token; RUNNING -> HANDOFF
    # by it, then HANDOFF -> RUNNING (or -> FINISHED) by the decode replica the frontend relays it to
    HANDOFF = 5


MAX_REPLICAS = 64  # engine replicas (--dp) of one region


class EngineState(IntEnum):
    STARTING = 0
    READY = 1
    ERROR = 3  # 2 was DEAD, never written


@dataclass(frozen=True)
class RegionSpec:
    """Sizes of a region. ring_capacity 0 means the next power of two >= 4 * num_slots.

    A slot has at most three records in a ring at once (an ABORT of its previous generation,
    SUBMIT, ABORT), so a ring of 3 * num_slots records never fills. `logprob_ring` is the number
    of positions of log-probabilities each slot holds until the frontend reads them (extras.py).
    `num_replicas` engine replicas (--dp) share the slots; each has its own submit ring of
    ring_capacity records, semaphore and header section (layout.EngineSection).
    """

    num_slots: int
    max_tokens_per_slot: int
    ring_capacity: int = 0
    logprob_ring: int = 256
    num_replicas: int = 1
    # tensor parallelism (steps.py): one step channel per engine group whose ranks 1..N-1 follow
    # rank 0, with `step_followers` followers and records of up to `step_record` bytes
    step_channels: int = 0
    step_followers: int = 0
    step_record: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.num_slots < 2**31:
            raise ValueError(f"num_slots must be in [1, 2**31), got {self.num_slots}")
        if not 1 < self.max_tokens_per_slot < 2**31:
            raise ValueError(f"max_tokens_per_slot must be in [2, 2**31), got {self.max_tokens_per_slot}")
        cap = self.ring_capacity
        if cap < 0 or cap & (cap - 1) or 0 < cap < 3 * self.num_slots:
            raise ValueError(f"ring_capacity must be 0 or a power of two >= 3 * num_slots, got {cap}")
        if not 2 <= self.logprob_ring < 2**20:
            raise ValueError(f"logprob_ring must be in [2, 2**20), got {self.logprob_ring}")
        if not 1 <= self.num_replicas <= MAX_REPLICAS:
            raise ValueError(f"num_replicas must be in [1, {MAX_REPLICAS}], got {self.num_replicas}")
        if min(self.step_channels, self.step_followers, self.step_record) < 0 or (
            self.step_channels and not (self.step_followers and self.step_record)
        ):
            raise ValueError("step channels need followers and a record size")

    def resolved(self) -> RegionSpec:
        """The same spec with ring_capacity filled in."""
        if self.ring_capacity:
            return self
        cap = 1 << (4 * self.num_slots - 1).bit_length()
        return dataclasses.replace(self, ring_capacity=cap)


@dataclass(frozen=True)
class EngineStats:
    """One replica's engine rank 0's gauges and counters, published as one snapshot (for /metrics
    and tests)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_tokens_free: int = 0
    kv_tokens_total: int = 0
    num_preemptions: int = 0  # counters from here on: totals since the engine started
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0  # prompt tokens found in the prefix cache at first admission
    prefix_queried_tokens_total: int = 0  # prompt tokens looked up there (none when it is off)
    kv_sent_tokens_total: int = 0  # --pd, a prefill replica: positions of KV it handed off
    kv_received_tokens_total: int = 0  # --pd, a decode replica: positions of KV it received


ENGINE_STATS_FIELDS = len(fields(EngineStats))


def total_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """The replicas' snapshots added field by field: every field is a gauge or a counter of
    something the replicas hold apart (requests, KV tokens), so the sum is the server's."""
    if len(stats) == 1:
        return stats[0]
    return EngineStats(*(sum(column) for column in zip(*(astuple(s) for s in stats), strict=True)))


class RingRecord(NamedTuple):
    """One submit-ring record: what the frontend asks of the engine about (slot, gen)."""

    slot: int
    gen: int
    op: Op


@dataclass(frozen=True, slots=True)
class RequestView:
    """A queued request as the engine reads it."""

    slot: int
    gen: int
    prompt_ids: list[int]
    params: SamplingParams
    submit_time: float


@dataclass(frozen=True, slots=True)
class HandoffView:
    """--pd: a request a prefill replica handed off, as its decode replica reads it: the output
    so far (the first token), and the transfer that brings the KV of every position but the last
    known one (`source` replica's transfer number `seq` to this replica)."""

    slot: int
    gen: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int]
    source: int
    seq: int
    cached_tokens: int

    @property
    def num_kv(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass(frozen=True, slots=True)
class OutputView:
    """What the frontend reads of a slot's output: tokens[start:num_tokens] and the engine's fields.

    `finished` means `num_tokens` is final. Times are time.monotonic() seconds (one clock for all
    processes of a host); 0.0 when not reached yet.
    """

    tokens: list[int]
    num_tokens: int
    finished: bool
    finish_reason: FinishReason
    cached_tokens: int
    logprobs: list[float] | None = None
    prompt_len: int = 0
    submit_time: float = 0.0
    first_token_time: float = 0.0
    finish_time: float = 0.0
