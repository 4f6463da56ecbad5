"""The sampling extras of a region: per-slot fields beside the slot table, logit biases, and the
log-probability ring. Added after the slot table's layout, and kept apart from it.

    ext_off    SlotExt[num_slots]                          (128 bytes each: a frontend line, an engine line)
    bias_off   int32[num_slots][MAX_LOGIT_BIAS]            logit_bias token ids
               float32[num_slots][MAX_LOGIT_BIAS]          ... and their biases
    lp_off     float32[num_slots][R]                       logprob of the token at position q, at [q % R]
               int32[num_slots][R][MAX_TOP_LOGPROBS]       the most likely tokens at q, best first
               float32[num_slots][R][MAX_TOP_LOGPROBS]     ... and their logprobs

The log-probability ring holds R positions per slot (RegionSpec.logprob_ring, 256 by default):
4 + 8 * MAX_TOP_LOGPROBS = 164 bytes a position, 42 KiB a slot, 10.5 MiB for 256 slots, whatever
the context length. Positions are absolute (prompt and output in one numbering), so one ring
carries a request's prompt log-probabilities (echo) and its output's. Flow control keeps it
bounded without losing an entry: the engine publishes the entries of positions below `lp_end`
(release store after writing them), the frontend's reader copies them out and release-stores
`lp_read`; the engine never writes position q unless q < lp_read + R (`logprob_limit`), and its
scheduler holds back a request whose next step would pass that limit until the reader catches up.

Ownership and publication (one writer per field, as in layout.py):

    min_tokens, num_bias, top_logprobs,    frontend, while WRITING;    read_request after its
      prompt_logprobs, biases, lp_read       published by submit's CAS  acquire of the control word
    lp_read (while RUNNING)                frontend reader: release    logprob_limit: acquire
    lp_end (reset by set_running, which    engine: release after the   logprob_end: acquire, then
      publishes the reset by its CAS)        ring entries below it       the entries below it
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightllm_async.types import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

CACHE_LINE = 64
TOP = MAX_TOP_LOGPROBS


class SlotExt(ctypes.Structure):
    """A slot's sampling extras. The frontend line and the engine line never share a cache line."""

    _fields_ = [
        # frontend: written in WRITING, published by the WRITING -> QUEUED CAS
        ("min_tokens", ctypes.c_uint32),
        ("num_bias", ctypes.c_uint16),
        ("top_logprobs", ctypes.c_uint8),
        ("prompt_logprobs", ctypes.c_uint8),
        # frontend (the reader), release-stored while RUNNING: ring entries below it were copied
        ("lp_read", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint8 * 52),
        # engine: reset by set_running; release-stored after the ring entries below it
        ("lp_end", ctypes.c_uint32),
        ("_pad1", ctypes.c_uint8 * 60),
    ]


assert ctypes.sizeof(SlotExt) == 2 * CACHE_LINE and SlotExt.lp_end.offset == CACHE_LINE
EXT_FIELDS = struct.Struct("=IHBB")  # min_tokens .. prompt_logprobs, packed in one call
EXT_SIZE = ctypes.sizeof(SlotExt)


def _align(x: int, a: int = CACHE_LINE) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class ExtrasLayout:
    """Offsets of the extras, from `base` (the end of the token arenas)."""

    num_slots: int
    ring: int  # R: positions per slot in the log-probability ring
    ext_off: int
    bias_ids_off: int
    bias_vals_off: int
    lp_chosen_off: int
    lp_ids_off: int
    lp_vals_off: int
    end: int

    @classmethod
    def of(cls, num_slots: int, ring: int, base: int) -> ExtrasLayout:
        n, r = num_slots, ring
        ext = _align(base)
        bias_ids = _align(ext + n * EXT_SIZE)
        bias_vals = _align(bias_ids + 4 * n * MAX_LOGIT_BIAS)
        chosen = _align(bias_vals + 4 * n * MAX_LOGIT_BIAS)
        ids = _align(chosen + 4 * n * r)
        vals = _align(ids + 4 * n * r * TOP)
        return cls(n, r, ext, bias_ids, bias_vals, chosen, ids, vals, vals + 4 * n * r * TOP)


class Extras:
    """Views of the extras in one mapping; the region views call these, each side its own."""

    def __init__(self, mm, lay: ExtrasLayout):
        n, r = lay.num_slots, lay.ring
        self.layout = lay
        self.table = (SlotExt * n).from_buffer(mm, lay.ext_off)
        self.bias_ids = np.frombuffer(mm, np.int32, n * MAX_LOGIT_BIAS, lay.bias_ids_off).reshape(n, -1)
        self.bias_vals = np.frombuffer(mm, np.float32, n * MAX_LOGIT_BIAS, lay.bias_vals_off).reshape(n, -1)
        self.lp_chosen = np.frombuffer(mm, np.float32, n * r, lay.lp_chosen_off).reshape(n, r)
        self.lp_ids = np.frombuffer(mm, np.int32, n * r * TOP, lay.lp_ids_off).reshape(n, r, TOP)
        self.lp_vals = np.frombuffer(mm, np.float32, n * r * TOP, lay.lp_vals_off).reshape(n, r, TOP)
        self.lp_end = np.ndarray((n,), np.uint32, buffer=mm, offset=self.lp_end_base, strides=(EXT_SIZE,))

    @property
    def lp_read_base(self) -> int:
        return self.layout.ext_off + SlotExt.lp_read.offset

    @property
    def lp_end_base(self) -> int:
        return self.layout.ext_off + SlotExt.lp_end.offset

    def field_off(self, slot: int, base: int) -> int:
        return base + slot * EXT_SIZE

    def write(self, mm, slot: int, min_tokens: int, top: int, prompt: bool, bias: Sequence, first: int):
        """The frontend's part of a WRITING slot (`first`: the first logprob position)."""
        off = self.layout.ext_off + slot * EXT_SIZE
        EXT_FIELDS.pack_into(mm, off, min_tokens, len(bias), top, prompt)
        if bias:
            ids, vals = zip(*bias, strict=True)
            self.bias_ids[slot, : len(bias)] = ids
            self.bias_vals[slot, : len(bias)] = vals
        self.table[slot].lp_read = first

    def read(self, mm, slot: int) -> tuple[int, int, bool, tuple[tuple[int, float], ...]]:
        """(min_tokens, top_logprobs, prompt_logprobs, logit_bias) of a slot the engine reads."""
        min_tokens, num_bias, top, prompt = EXT_FIELDS.unpack_from(mm, self.layout.ext_off + slot * EXT_SIZE)
        num_bias = min(num_bias, MAX_LOGIT_BIAS)
        ids, vals = self.bias_ids[slot, :num_bias].tolist(), self.bias_vals[slot, :num_bias].tolist()
        bias = tuple(zip(ids, vals, strict=True))
        return min_tokens, top, bool(prompt), bias

    def ring_index(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64) % self.layout.ring

    def copy_logprobs(self, slot: int, start: int, stop: int, k: int) -> tuple[np.ndarray, ...]:
        """Copies of the entries of positions [start, stop) (at most R): chosen [m], ids [m, k],
        logprobs [m, k]."""
        idx = self.ring_index(start, stop)
        return self.lp_chosen[slot, idx], self.lp_ids[slot, idx, :k], self.lp_vals[slot, idx, :k]
