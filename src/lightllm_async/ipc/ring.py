"""Single-producer single-consumer ring of (slot, gen, op) records inside a shared buffer.

Layout at `off` (64-byte aligned):

    [0, 64)     u64 tail    records pushed so far; written by the producer only
    [64, 128)   u64 head    records consumed so far; written by the consumer only
    [128, ...)  capacity records of 16 bytes: u32 slot, u32 gen, u32 op, u32 unused

Record k lives at index k % capacity (capacity is a power of two; the u64 counters never wrap in
practice). The producer writes record `tail` and then release-stores tail + 1: the consumer's
acquire load of tail makes the record visible. The consumer reads records [head, tail) and then
release-stores the new head: the producer's acquire load of head tells it those cells may be
overwritten. One producer process (and one thread in it, or a lock) and one consumer.
"""

from __future__ import annotations

import struct
from typing import Any

from lightllm_async.ipc import atomics
from lightllm_async.ipc.types import Op, RingRecord

_RECORD = struct.Struct("=IIII")
_HEAD = 64
_RECORDS = 128


class SubmitRing:
    """A view of one ring; the same class serves the producer (push) and the consumer (pop_all)."""

    RECORD_BYTES = _RECORD.size

    def __init__(self, buf: Any, off: int, capacity: int) -> None:
        if capacity <= 0 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two, got {capacity}")
        self._buf = buf
        self._tail_off = off
        self._head_off = off + _HEAD
        self._rec_off = off + _RECORDS
        self.capacity = capacity

    @staticmethod
    def nbytes(capacity: int) -> int:
        return _RECORDS + _RECORD.size * capacity

    def push(self, slot: int, gen: int, op: Op) -> bool:
        """Append one record; False (nothing written) when the ring is full."""
        tail = atomics.load_acquire_u64(self._buf, self._tail_off)  # our own counter
        head = atomics.load_acquire_u64(self._buf, self._head_off)  # pairs with pop_all's release
        if tail - head >= self.capacity:
            return False
        pos = self._rec_off + _RECORD.size * (tail & (self.capacity - 1))
        _RECORD.pack_into(self._buf, pos, slot, gen, int(op), 0)
        atomics.store_release_u64(self._buf, self._tail_off, tail + 1)  # publishes the record
        return True

    def pop_all(self, limit: int = 0) -> list[RingRecord]:
        """Take every published record (at most `limit` if > 0), oldest first."""
        head = atomics.load_acquire_u64(self._buf, self._head_off)  # our own counter
        tail = atomics.load_acquire_u64(self._buf, self._tail_off)  # pairs with push's release
        if limit > 0:
            tail = min(tail, head + limit)
        out = []
        mask = self.capacity - 1
        for k in range(head, tail):
            slot, gen, op, _ = _RECORD.unpack_from(self._buf, self._rec_off + _RECORD.size * (k & mask))
            out.append(RingRecord(slot, gen, Op(op)))
        if tail != head:
            atomics.store_release_u64(self._buf, self._head_off, tail)  # frees the cells we read
        return out

    def spin_until_pending(self, max_ns: int) -> bool:
        """Consumer: busy-wait (GIL released) up to `max_ns` for a record; True if one came."""
        head = atomics.load_acquire_u64(self._buf, self._head_off)  # our own counter
        return atomics.spin_while_equal_u64(self._buf, self._tail_off, head, max_ns)

    def pending(self) -> int:
        """Published records not consumed yet (exact for the consumer, a lower bound for others)."""
        head = atomics.load_acquire_u64(self._buf, self._head_off)
        tail = atomics.load_acquire_u64(self._buf, self._tail_off)
        return tail - head
