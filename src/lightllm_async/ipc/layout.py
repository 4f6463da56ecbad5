"""Byte layout of a region: header, engine sections, slot table, free-slot stack, submit rings,
token arenas.

    offset 0          Header            (one per region; the creator's fields and frontend_busy)
    engines_off       EngineSection[num_replicas]  (one per engine replica, --dp; 64-byte aligned)
    slots_off         Slot[num_slots]   (256 bytes each, 64-byte aligned)
    stack_off         free-slot stack   (csrc/atomics.c: head, n, count, next[num_slots])
    ring_off          submit rings      (ring.py: tail line, head line, records), replica k's at
                                        ring_off + k * ring_stride
    tokens_off        int32[num_slots][max_tokens_per_slot]   prompt ids, then output ids
    logprobs_off      float32[num_slots][max_tokens_per_slot] logprob of output token i at [i]
    ext_off           the sampling extras (extras.py): SlotExt[num_slots], logit biases, and the
                      log-probability ring

Data parallelism (--dp N): N engine replicas share the slot table, the free stack and the arenas;
a slot's index is its identity for all of them. The frontend submits a slot to one replica's
ring and that replica alone runs it: it is the writer of the slot's engine section from
QUEUED -> RUNNING until FINISHED (the next generation may go to another replica). Each replica
writes only its own EngineSection; the frontend reads them all.

Every field has one writer process; the comment on each group names it. A field read by another
process is published by a release store (or a CAS, which is sequentially consistent) that the
writer makes after writing it, and read after the matching acquire load. The complete list:

    data                                   published by (writer)                 read after (reader)
    layout fields, free stack, magic       create: store magic                   attach: load magic
    request fields, prompt ids, abort=0,   submit / start_request: CAS           read_request: load control
      submit_time                            WRITING -> QUEUED                     (also the engine's later
                                                                                    reads of prompt_len)
    ring record (replica k's ring)         ring.push: store tail                 ring.pop_all: load tail
    ring cells free for reuse              ring.pop_all: store head              ring.push: load head
    engine-field reset of a reused slot    set_running: CAS QUEUED -> RUNNING    read_output, poll_output(s):
                                                                                   load control
    output ids, logprobs, first_token_     append_tokens: store num_output       read_output, poll_output:
      time, cached_tokens                  append_step: scatter_release_u32 of     load num_output;
                                             every num_output of the step        poll_outputs: gather_acquire
                                                                                   of every num_output, after
                                                                                   gathering every control
    finish_reason, finish_time, final      finish: CAS -> FINISHED               read_output, poll_output(s):
      num_output                                                                   load control; then
                                                                                   read_finish, read_tokens
    abort request                          abort: store abort=1                  is_aborted: load abort
    generation bump, slot free             free_slot: CAS -> FREE, then the      alloc_slot: stack pop
                                             stack push (release CAS of head)      (acquire), load control
    replica k's section (EngineSection k): written by replica k's rank 0 only
    engine_pid, error_len, error_text      set_engine_state: store engine_state  replica_state/_pid/_error:
                                                                                   load state
    stats                                  set_engine_stats: seqlock stats_seq   replica_stats: seqlock
    heartbeat                              beat: fetch-add (a counter, publishes nothing else)

Two flags pair a store and a load on each side with a full fence between (Dekker: one of the two
sides sees the other's store), so that a sleeper is always woken:

    ring k's tail vs replica k's           _wake_engine(k): tail stored, fence, engine_idle loaded;
      engine_idle                          wait_engine: engine_idle stored, fence, tail loaded
    every replica's notify_seq vs          notify_frontend: own notify_seq added, fence,
      frontend_busy                          frontend_busy loaded (post only if clear);
                                           set_frontend_busy(False): flag stored, fence, every
                                             notify_seq loaded (read the slots again if the sum moved)

Semaphore posts and eventfd writes are wake-ups only: they carry no data, and every reader above
re-reads the published counts with acquire loads after waking.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from lightllm_async.ipc import atomics
from lightllm_async.ipc.extras import ExtrasLayout
from lightllm_async.ipc.ring import SubmitRing
from lightllm_async.ipc.steps import channel_bytes
from lightllm_async.ipc.types import ENGINE_STATS_FIELDS, RegionSpec
from lightllm_async.types import MAX_STOP_IDS

MAGIC = 0x3130_4D48_534C_4C41  # b"ALLSHM01" read little-endian
VERSION = 2  # 2: engine sections and submit rings per replica (--dp)
ERROR_TEXT_BYTES = 1024
CACHE_LINE = 64


class Header(ctypes.Structure):
    """Region header. The creator writes the layout fields once, `magic` last (release store)."""

    _fields_ = [
        # creator (frontend), written once before anyone attaches
        ("magic", ctypes.c_uint64),
        ("version", ctypes.c_uint32),
        ("owner_pid", ctypes.c_int32),
        ("num_slots", ctypes.c_uint32),
        ("max_tokens_per_slot", ctypes.c_uint32),
        ("ring_capacity", ctypes.c_uint32),
        ("slot_size", ctypes.c_uint32),
        ("total_size", ctypes.c_uint64),
        ("slots_off", ctypes.c_uint64),
        ("stack_off", ctypes.c_uint64),
        ("ring_off", ctypes.c_uint64),
        ("tokens_off", ctypes.c_uint64),
        ("logprobs_off", ctypes.c_uint64),
        # frontend (its reader: the relay thread sets it before each eventfd write, the loop
        # thread clears it after each pass): 1 while the reader is sure to read the slots again,
        # so the engines skip their posts (Dekker pair with each notify_seq, like engine_idle)
        ("frontend_busy", ctypes.c_uint32),
        # creator (frontend), written once: the sampling extras (extras.py), the replicas
        ("logprob_ring", ctypes.c_uint32),
        ("ext_off", ctypes.c_uint64),
        ("num_replicas", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("engines_off", ctypes.c_uint64),
        ("ring_stride", ctypes.c_uint64),
        # creator (frontend), written once: the tensor-parallel step channels (steps.py)
        ("steps_off", ctypes.c_uint64),
        ("step_record", ctypes.c_uint64),
        ("step_channels", ctypes.c_uint32),
        ("step_followers", ctypes.c_uint32),
    ]


class EngineSection(ctypes.Structure):
    """One engine replica's part of the header; written by that replica's rank 0 only."""

    _fields_ = [
        # engine_state is release-stored after engine_pid and error_text
        ("engine_state", ctypes.c_uint32),
        ("engine_pid", ctypes.c_int32),
        ("engine_idle", ctypes.c_uint32),  # 1 while the engine sleeps on its semaphore
        ("error_len", ctypes.c_uint32),
        ("heartbeat", ctypes.c_uint64),  # fetch-add once per engine step
        ("notify_seq", ctypes.c_uint64),  # fetch-add by every notify_frontend, before its flag check
        ("_pad1", ctypes.c_uint8 * 32),
        # seqlock: stats_seq is odd while `stats` is being written (EngineStats order)
        ("stats_seq", ctypes.c_uint64),
        ("stats", ctypes.c_uint64 * ENGINE_STATS_FIELDS),
        ("_pad2", ctypes.c_uint8 * (120 - 8 * ENGINE_STATS_FIELDS)),
        ("error_text", ctypes.c_char * ERROR_TEXT_BYTES),  # UTF-8, error_len bytes
    ]


class Slot(ctypes.Structure):
    """One request slot. `control` packs state (low 32 bits) and generation (high 32 bits) so that
    one 64-bit CAS checks the generation and moves the state; the free CAS also bumps the generation.
    """

    _fields_ = [
        # both sides, by CAS only (see SlotState for who makes which transition)
        ("control", ctypes.c_uint64),
        # frontend: written in WRITING, published by the WRITING -> QUEUED CAS
        ("prompt_len", ctypes.c_uint32),
        ("max_new_tokens", ctypes.c_uint32),
        ("temperature", ctypes.c_double),
        ("top_p", ctypes.c_double),
        ("min_p", ctypes.c_double),
        ("presence_penalty", ctypes.c_double),
        ("frequency_penalty", ctypes.c_double),
        ("repetition_penalty", ctypes.c_double),
        ("seed", ctypes.c_uint64),  # meaningful when has_seed
        ("top_k", ctypes.c_int32),
        ("num_stop_ids", ctypes.c_uint8),
        ("ignore_eos", ctypes.c_uint8),
        ("logprobs", ctypes.c_uint8),
        ("has_seed", ctypes.c_uint8),
        ("stop_ids", ctypes.c_int32 * MAX_STOP_IDS),
        ("submit_time", ctypes.c_double),
        # frontend: release-stored 0 -> 1 by abort(), reset while WRITING
        ("abort", ctypes.c_uint32),
        # frontend, written in WRITING (--pd): the decode replica a prefill replica hands off to (-1: none)
        ("handoff_to", ctypes.c_int32),
        # frontend, written in WRITING (--role decode): a request another server's prefill engine
        # handed off, submitted here to take over: that engine's group rank (-1: an ordinary
        # request), its transfer number, its cached_tokens, and how many output tokens it made
        # (written after the prompt in the token arena, also in WRITING)
        ("resume_from", ctypes.c_int32),
        ("resume_outputs", ctypes.c_uint32),
        ("resume_cached", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("resume_seq", ctypes.c_uint64),
        ("_pad1", ctypes.c_uint8 * 8),
        # engine: reset before QUEUED -> RUNNING; num_output is release-stored after the tokens,
        # logprobs, first_token_time and cached_tokens it publishes; finish_reason and finish_time
        # are published by the -> FINISHED CAS
        ("num_output", ctypes.c_uint32),
        ("finish_reason", ctypes.c_uint32),
        ("cached_tokens", ctypes.c_uint32),
        # --pd, the prefill replica: itself and its per-decode-replica transfer number, published by
        # the RUNNING -> HANDOFF CAS
        ("handoff_from", ctypes.c_uint32),
        ("first_token_time", ctypes.c_double),
        ("finish_time", ctypes.c_double),
        ("scheduled_time", ctypes.c_double),  # first admission to the running batch (monotonic)
        ("handoff_seq", ctypes.c_uint64),
        ("_pad3", ctypes.c_uint8 * 16),
    ]


assert ctypes.sizeof(Slot) % CACHE_LINE == 0, ctypes.sizeof(Slot)
assert Slot.num_output.offset % CACHE_LINE == 0  # the engine section starts on its own line
assert ctypes.sizeof(EngineSection) % CACHE_LINE == 0, ctypes.sizeof(EngineSection)
assert EngineSection.stats_seq.offset % CACHE_LINE == 0 and EngineSection.error_text.offset % CACHE_LINE == 0

# The request fields of a slot, prompt_len through stop_ids, as one struct: write_request packs them
# with one call and read_request unpacks them with one (ctypes field access costs ~0.2 us a field).
REQUEST_FIELDS = struct.Struct(f"=II6dQi4B{MAX_STOP_IDS}i")
assert REQUEST_FIELDS.size == Slot.submit_time.offset - Slot.prompt_len.offset
assert Slot.stop_ids.offset + ctypes.sizeof(Slot.stop_ids.size * ctypes.c_char) == Slot.submit_time.offset

SLOT_SIZE = ctypes.sizeof(Slot)
CONTROL = Slot.control.offset
PROMPT_LEN = Slot.prompt_len.offset
SUBMIT_TIME = Slot.submit_time.offset
ABORT = Slot.abort.offset
NUM_OUTPUT = Slot.num_output.offset
FINISH_REASON = Slot.finish_reason.offset
FIRST_TOKEN_TIME = Slot.first_token_time.offset
FRONTEND_BUSY = Header.frontend_busy.offset
MAGIC_OFF = Header.magic.offset
# offsets inside an EngineSection: add Layout.engine_off(k)
ENGINE_STATE = EngineSection.engine_state.offset
ENGINE_IDLE = EngineSection.engine_idle.offset
HEARTBEAT = EngineSection.heartbeat.offset
NOTIFY_SEQ = EngineSection.notify_seq.offset
STATS_SEQ = EngineSection.stats_seq.offset


def _align(x: int, a: int = CACHE_LINE) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Byte offsets of a region's parts, computed from a resolved RegionSpec."""

    spec: RegionSpec
    engines_off: int
    slots_off: int
    stack_off: int
    ring_off: int
    ring_stride: int
    tokens_off: int
    logprobs_off: int
    extras: ExtrasLayout
    total_size: int
    steps_off: int = 0

    @classmethod
    def of(cls, spec: RegionSpec) -> Layout:
        spec = spec.resolved()
        n, t, r = spec.num_slots, spec.max_tokens_per_slot, spec.num_replicas
        engines_off = _align(ctypes.sizeof(Header))
        slots_off = _align(engines_off + r * ctypes.sizeof(EngineSection))
        stack_off = _align(slots_off + n * ctypes.sizeof(Slot))
        ring_off = _align(stack_off + atomics.slot_stack_nbytes(n))
        ring_stride = _align(SubmitRing.nbytes(spec.ring_capacity))
        tokens_off = _align(ring_off + r * ring_stride)
        logprobs_off = _align(tokens_off + 4 * n * t)
        extras = ExtrasLayout.of(n, spec.logprob_ring, logprobs_off + 4 * n * t)
        steps_off = _align(extras.end)
        steps_end = steps_off + spec.step_channels * channel_bytes(spec.step_followers, spec.step_record)
        total = _align(steps_end, 4096)
        return cls(
            spec, engines_off, slots_off, stack_off, ring_off, ring_stride, tokens_off, logprobs_off,
            extras, total, steps_off,
        )  # fmt: skip

    def step_channel_off(self, group: int) -> int:
        if not 0 <= group < self.spec.step_channels:
            raise ValueError(f"no step channel {group} (the region has {self.spec.step_channels})")
        return self.steps_off + group * channel_bytes(self.spec.step_followers, self.spec.step_record)

    def slot_off(self, slot: int) -> int:
        return self.slots_off + slot * ctypes.sizeof(Slot)

    def engine_off(self, replica: int) -> int:
        """Where replica `replica`'s EngineSection starts."""
        return self.engines_off + self._replica(replica) * ctypes.sizeof(EngineSection)

    def replica_ring_off(self, replica: int) -> int:
        """Where replica `replica`'s submit ring starts."""
        return self.ring_off + self._replica(replica) * self.ring_stride

    def _replica(self, replica: int) -> int:
        if not 0 <= replica < self.spec.num_replicas:
            raise IndexError(f"replica {replica} out of range [0, {self.spec.num_replicas})")
        return replica

    def write_header(self, h: Header, owner_pid: int) -> None:
        """Fill the layout fields (not magic: the creator release-stores it last)."""
        h.version, h.owner_pid = VERSION, owner_pid
        h.num_slots, h.max_tokens_per_slot = self.spec.num_slots, self.spec.max_tokens_per_slot
        h.ring_capacity, h.slot_size = self.spec.ring_capacity, ctypes.sizeof(Slot)
        h.total_size, h.slots_off, h.stack_off = self.total_size, self.slots_off, self.stack_off
        h.ring_off, h.tokens_off, h.logprobs_off = self.ring_off, self.tokens_off, self.logprobs_off
        h.logprob_ring, h.ext_off = self.spec.logprob_ring, self.extras.ext_off
        h.num_replicas, h.engines_off = self.spec.num_replicas, self.engines_off
        h.ring_stride = self.ring_stride
        h.steps_off, h.step_record = self.steps_off, self.spec.step_record
        h.step_channels, h.step_followers = self.spec.step_channels, self.spec.step_followers

    @classmethod
    def from_header(cls, h: Header) -> Layout:
        """The layout an attaching process recomputes, checked against what the creator wrote."""
        if h.magic != MAGIC or h.version != VERSION:
            raise ValueError(f"not a lightllm-async region (magic {h.magic:#x}, version {h.version})")
        spec = RegionSpec(
            h.num_slots, h.max_tokens_per_slot, h.ring_capacity, h.logprob_ring, h.num_replicas,
            h.step_channels, h.step_followers, h.step_record,
        )  # fmt: skip
        layout = cls.of(spec)
        stored = (
            h.slot_size, h.total_size, h.engines_off, h.slots_off, h.stack_off, h.ring_off, h.ring_stride,
            h.tokens_off, h.ext_off, h.steps_off,
        )  # fmt: skip
        mine = (
            ctypes.sizeof(Slot), layout.total_size, layout.engines_off, layout.slots_off, layout.stack_off,
            layout.ring_off, layout.ring_stride, layout.tokens_off, layout.extras.ext_off, layout.steps_off,
        )  # fmt: skip
        if stored != mine:
            raise ValueError("region layout differs from this build's; mixed versions?")
        return layout
