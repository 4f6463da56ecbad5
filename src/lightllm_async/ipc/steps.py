"""The step record of tensor parallelism: engine rank 0 publishes each step's plan, ranks 1..N-1
read it and run the same forward on their shards. No per-step RPC: a section of the region.

A channel (one per engine group) is a control area and two record buffers:

    line 0          seq      rank 0: release-stores N after writing record N into buffer N % 2
    line 1 + r      ack[r]   follower r (1..N-1): release-stores N once it has copied record N out
    buffer 0, 1     records  rank 0 writes buffer N % 2 only after every ack >= N - 2

so a follower reads a buffer rank 0 will not touch until it acks, and rank 0 runs at most two
records ahead of the slowest follower (it is one step ahead anyway: launch N+1, then collect N).
Followers spin on `seq` for a while, then sleep in short naps (the step loop's own cadence).

A record: a fixed header, then int64 arrays, then the sampling parameters of the requests the
followers have not seen yet (msgpack, the only variable part):

    header   step, kind, n_items, n_tokens, n_kv, n_prefix, params_len
    items    [n_items, ITEM_FIELDS]  slot gen epoch row start n_tokens n_kv n_prefix samples
                                     num_output prompt_len next_token
    tokens   [n_tokens]  the items' token_ids, concatenated (PENDING_TOKEN where not known)
    kv       [n_kv]      the items' new_kv_slots, concatenated
    prefix   [n_prefix]  the items' prefix_kv_slots, concatenated
    params   msgpack [(slot, gen, SamplingParams), ...] of items whose params are new to followers

Parameters travel once per request (rank 0 remembers what it announced per slot), so a follower
never reads the slot table: the record alone describes a step, which is also what crosses hosts
(`encode`/`decode` work on any buffer; across hosts the bytes are broadcast over the group).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import msgspec
import numpy as np

from lightllm_async.batch import PENDING_TOKEN, Batch, ScheduledReq
from lightllm_async.ipc import atomics
from lightllm_async.types import SamplingParams

CACHE_LINE = 64
KIND_STEP, KIND_STOP = 1, 2
_HEADER = struct.Struct("=QIIIIII")  # step, kind, n_items, n_tokens, n_kv, n_prefix, params_len
_HEADER_BYTES = 32
assert _HEADER.size <= _HEADER_BYTES
ITEM_FIELDS = 12
# The msgpack of one request's SamplingParams, bounded: stop strings never cross the region (the
# engine's params have none), 16 stop ids, 300 logit-bias pairs at <= 14 bytes, scalars.
PARAMS_BYTES_BOUND = 8192
# A follower busy-waits this long for the next record before napping: longer than a step, so
# that a busy server's next record is seen at once (a nap on the critical path delays every
# rank: each collective waits for the last one to arrive); on a GPU host a core per rank is there
# to spare. Rank 0 waits for acks this long too. On the CPU, where the ranks' compute threads need
# every core, followers spin CPU_SPIN_S.
SPIN_S = 0.05
CPU_SPIN_S = 0.0005
NAP_S = 0.0002  # then nap this long between looks, for a second; then LONG_NAP_S (an idle server)
LONG_NAP_S = 0.002

_params_encoder = msgspec.msgpack.Encoder()
_params_decoder = msgspec.msgpack.Decoder(list[tuple[int, int, SamplingParams]])


def record_bytes(max_items: int, max_tokens: int, max_prefix: int) -> int:
    """The largest record a step of at most these sizes makes."""
    arrays = 8 * (max_items * ITEM_FIELDS + 2 * max_tokens + max_prefix)
    return _align(_HEADER_BYTES + arrays + max_items * PARAMS_BYTES_BOUND)


def channel_bytes(num_followers: int, record: int) -> int:
    return _align(CACHE_LINE * (1 + num_followers)) + 2 * _align(record)


def _align(x: int, a: int = CACHE_LINE) -> int:
    return (x + a - 1) // a * a


def encode(batch: Batch, announced: dict[int, SamplingParams], buf, off: int, cap: int) -> int:
    """Write `batch` as a record at buf[off:off + cap]; the bytes written. `announced` (slot ->
    the params object followers last received for it) is updated with what this record carries.
    A decode run's rows are written from its columns (the record is the same as for its items)."""
    run, rest = batch.parts()
    n = len(batch.items)
    rows: list[tuple[int, ...]] = []
    tokens: list[int] = []
    kv: list[int] = []
    prefix: list[int] = []
    new_params = []
    if run is not None:
        for slot, gen, params in zip(run.slot.tolist(), run.gen.tolist(), run.params, strict=True):
            if announced.get(slot) is not params:
                announced[slot] = params
                new_params.append((slot, gen, params))
    for it in rest:
        rows.append(
            (it.slot, it.gen, it.epoch, it.row, it.start, len(it.token_ids), len(it.new_kv_slots),
             len(it.prefix_kv_slots), it.samples, it.num_output, it.prompt_len, it.next_token)
        )  # fmt: skip
        tokens.extend(it.token_ids)
        kv.extend(it.new_kv_slots)
        prefix.extend(it.prefix_kv_slots)
        if announced.get(it.slot) is not it.params:
            announced[it.slot] = it.params
            new_params.append((it.slot, it.gen, it.params))
    params = _params_encoder.encode(new_params) if new_params else b""
    arrays = (
        np.asarray(rows, np.int64).reshape(-1),
        np.asarray(tokens, np.int64),
        np.asarray(kv, np.int64),
        np.asarray(prefix, np.int64),
    )
    if run is not None:
        arrays = (
            np.concatenate((_run_rows(run).reshape(-1), arrays[0])),
            np.concatenate((np.asarray(run.token, np.int64), arrays[1])),
            np.concatenate((np.asarray(run.kv_slot, np.int64), arrays[2])),
            arrays[3],
        )
    size = _HEADER_BYTES + sum(a.nbytes for a in arrays) + len(params)
    if size > cap:
        raise ValueError(f"step {batch.step}: its record needs {size} bytes, the channel holds {cap}")
    n_tok, n_kv, n_pre = (a.size for a in arrays[1:])
    _HEADER.pack_into(buf, off, batch.step, KIND_STEP, n, n_tok, n_kv, n_pre, len(params))
    pos = off + _HEADER_BYTES
    view = memoryview(buf)
    for a in arrays:
        view[pos : pos + a.nbytes] = a.view(np.uint8)
        pos += a.nbytes
    view[pos : pos + len(params)] = params
    return size


def _run_rows(run) -> np.ndarray:
    """[k, ITEM_FIELDS] the rows a decode run's items would write."""
    k = len(run)
    one, zero = np.ones(k, np.int64), np.zeros(k, np.int64)
    fields = (
        run.slot, run.gen, run.epoch, run.row, run.start, one, one, zero, one, run.num_output,
        run.prompt_len, np.full(k, PENDING_TOKEN, np.int64),
    )  # fmt: skip
    return np.stack([np.asarray(f, np.int64) for f in fields], axis=1)


def encode_stop(buf, off: int) -> int:
    _HEADER.pack_into(buf, off, 0, KIND_STOP, 0, 0, 0, 0, 0)
    return _HEADER_BYTES


def decode(buf, off: int, known: dict[int, SamplingParams]) -> Batch | None:
    """The batch of the record at buf[off:], or None for a stop record. `known` (slot -> params,
    the follower's memory of what was announced) is updated first."""
    step, kind, n, n_tok, n_kv, n_pre, n_params = _HEADER.unpack_from(buf, off)
    if kind == KIND_STOP:
        return None
    if kind != KIND_STEP:
        raise ValueError(f"corrupt step record (kind {kind})")
    pos = off + _HEADER_BYTES

    def ints(count: int) -> list:
        nonlocal pos
        a = np.frombuffer(buf, dtype=np.int64, count=count, offset=pos)
        pos += 8 * count
        return a

    rows = ints(n * ITEM_FIELDS).reshape(n, ITEM_FIELDS).tolist()
    tokens, kv, prefix = ints(n_tok).tolist(), ints(n_kv).tolist(), ints(n_pre).tolist()
    if n_params:
        for slot, _gen, params in _params_decoder.decode(bytes(memoryview(buf)[pos : pos + n_params])):
            known[slot] = params
    items = []
    t = k = p = 0
    for slot, gen, epoch, row, start, nt, nk, npre, samples, num_output, prompt_len, next_token in rows:
        items.append(
            ScheduledReq(
                slot,
                gen,
                epoch,
                row,
                start,
                tuple(tokens[t : t + nt]),
                tuple(kv[k : k + nk]),
                bool(samples),
                known[slot],
                num_output,
                tuple(prefix[p : p + npre]),
                prompt_len,
                next_token,
            )  # fmt: skip
        )
        t, k, p = t + nt, k + nk, p + npre
    return Batch(tuple(items), step)


@dataclass
class StepChannel:
    """One engine group's channel at `off` in the region's buffer `buf` (see the module doc)."""

    buf: object
    off: int
    num_followers: int
    record: int  # bytes per record buffer

    @classmethod
    def at(cls, buf, off: int, num_followers: int, record: int) -> StepChannel:
        return cls(buf, off, num_followers, _align(record))

    @property
    def _seq_off(self) -> int:
        return self.off

    def _ack_off(self, follower: int) -> int:
        return self.off + CACHE_LINE * follower  # follower is 1..num_followers

    def _buffer_off(self, seq: int) -> int:
        return self.off + _align(CACHE_LINE * (1 + self.num_followers)) + (seq % 2) * self.record

    def published(self) -> int:
        return atomics.load_acquire_u64(self.buf, self._seq_off)

    def acked(self, follower: int) -> int:
        return atomics.load_acquire_u64(self.buf, self._ack_off(follower))


class StepWriter:
    """Rank 0's end: `publish(batch)` before launching it, `stop()` when the engine leaves."""

    def __init__(self, channel: StepChannel):
        self.ch = channel
        self.seq = channel.published()
        self.announced: dict[int, SamplingParams] = {}

    def publish(self, batch: Batch) -> None:
        off = self._claim()
        encode(batch, self.announced, self.ch.buf, off, self.ch.record)
        self._release()

    def stop(self) -> None:
        encode_stop(self.ch.buf, self._claim())
        self._release()

    def idle(self) -> None:
        """Nothing to tell followers on this host: the server watches their processes."""

    def _claim(self) -> int:
        """The buffer of the next record, once every follower is done with its last occupant."""
        nxt = self.seq + 1
        deadline = None
        for f in range(1, self.ch.num_followers + 1):
            while self.ch.acked(f) < nxt - 2:
                deadline = deadline or time.monotonic() + SPIN_S
                if time.monotonic() > deadline:
                    time.sleep(NAP_S)
        return self.ch._buffer_off(nxt)

    def _release(self) -> None:
        self.seq += 1
        atomics.store_release_u64(self.ch.buf, self.ch._seq_off, self.seq)


class StepReader:
    """Follower `rank`'s end: `next()` is the next batch (None: rank 0 stopped), or a timeout."""

    def __init__(self, channel: StepChannel, rank: int, spin_s: float = SPIN_S):
        if not 1 <= rank <= channel.num_followers:
            raise ValueError(f"follower rank must be in [1, {channel.num_followers}], got {rank}")
        self.ch, self.rank = channel, rank
        self.seq = channel.acked(rank)
        self.known: dict[int, SamplingParams] = {}
        self._last = 0.0  # when the last record came (an idle follower naps instead of spinning)
        self.spin_ns = int(spin_s * 1e9)

    def next(self, timeout: float | None = None) -> Batch | None:
        """The next record's batch; TimeoutError if none comes within `timeout` seconds."""
        nxt = self.seq + 1
        if self.ch.published() < nxt:
            start = time.monotonic()
            if start - self._last < 1.0:  # busy: the next record is due within a step
                atomics.spin_while_equal_u64(self.ch.buf, self.ch._seq_off, self.seq, self.spin_ns)
            while self.ch.published() < nxt:
                waited = time.monotonic() - start
                if timeout is not None and waited > timeout:
                    raise TimeoutError("no step record")
                time.sleep(NAP_S if waited < 1.0 else LONG_NAP_S)
        batch = decode(self.ch.buf, self.ch._buffer_off(nxt), self.known)
        self.seq, self._last = nxt, time.monotonic()
        atomics.store_release_u64(self.ch.buf, self.ch._ack_off(self.rank), nxt)
        return batch
