"""A request's KV between a prefill and a decode engine (--pd), over torch.distributed point to
point: NCCL on CUDA, gloo on the CPU. Every prefill and decode engine joins one group (rank =
its replica index) at start; a transfer is one send per KV pool (layer by layer, as the cache
classes' `layers()` list them) of the request's positions, gathered into contiguous buffers.

Matching: NCCL has no tags, so a transfer is matched by order: a prefill engine sends its
transfers to one decode engine in the order of their numbers (`seq`, per pair), and the decode
engine receives from one prefill engine in the same order (engine/disagg.py holds back a
transfer that arrives before its predecessor). Under gloo the tag says the same again.

Threads: the blocking send/recv of one (prefill, decode) pair run on one worker thread per peer,
in order; the engine's loop only queues work and polls a flag (gloo's works report completion
only through a blocking wait). One thread per peer, not one per engine: with blocking sends, one
thread serving several peers could wait on a peer that waits on another, in a cycle.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightllm_async.config import EngineConfig
from lightllm_async.runner.distributed import watch_group

log = logging.getLogger(__name__)

# a transfer's receive has its own deadline (engine/disagg.py); the group's must not come first
GROUP_TIMEOUT = datetime.timedelta(days=365)
INIT_TIMEOUT = datetime.timedelta(minutes=30)
_MAX_POOLS = 1 << 12  # pools per transfer, for the gloo tag


def init_pd_group(cfg: EngineConfig, rank: int, device: torch.device) -> None:
    """Join the group of every prefill and decode engine (blocks until all have joined)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = None
    if backend == "nccl":  # transfers run beside the engines' steps: their kernels come first
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
    dist.init_process_group(
        backend,
        init_method=cfg.pd_init,
        rank=rank,
        world_size=cfg.pd_world,
        timeout=INIT_TIMEOUT,
        pg_options=options,
    )
    log.info("PD group: rank %d of %d joined (%s)", rank, cfg.pd_world, backend)


PEER_TIMEOUT_S = 3.0  # a peer whose beat has not moved this long is gone


def watch_peers(cfg: EngineConfig, rank: int) -> None:
    """--role: the group's engines are in other servers, which nobody here watches; a dead one
    leaves the group short (torch.distributed's world is fixed) and its transfers hanging. Each
    engine beats in the group's store and exits 1 when a peer stops (`distributed.watch_group`),
    so its server stops for its supervisor; all restarted, the group forms again."""
    watch_group(cfg.pd_init, rank, cfg.pd_world, "PD", PEER_TIMEOUT_S)


def _tag(seq: int, pool: int) -> int:
    return (seq % (1 << 18)) * _MAX_POOLS + pool


def bytes_per_token(pools: list[torch.Tensor]) -> int:
    """What one position of a transfer moves."""
    return sum(t[0].numel() * t.element_size() for t in pools)


class _PeerWorker:
    """Runs `job()`s for one peer, in the order queued, on a daemon thread; on CUDA, on a stream of
    its own. Not the engine's: the legacy default stream (every thread's current stream unless
    set) would order each gather, send and receive behind the engine's queued steps and those
    behind them (measured on 2 H200s: 27 ms per 95 MB transfer, 3.5 GB/s)."""

    def __init__(self, name: str, device: torch.device):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._device = device
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def put(self, job) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        if self._device.type != "cuda":
            while True:
                self._jobs.get()()
        torch.cuda.set_device(self._device)  # the current device is per thread
        # high priority: a gather's blocks go before the engine's step kernels as SMs free up
        with torch.cuda.stream(torch.cuda.Stream(self._device, priority=-1)):
            while True:
                self._jobs.get()()


@dataclass
class Transfer:
    """One transfer's tensors (a sender's pools, a receiver's buffers), one op each; `done` is set
    once they all returned (`error` says whether they failed)."""

    bufs: list[torch.Tensor]
    done: threading.Event
    error: BaseException | None = None


GROUP_BYTES = 64 << 20  # one NCCL message (and the gathered copy it is sent from) at most this


def _groups(pools: list[torch.Tensor], rows: int) -> list[list[int]]:
    """Consecutive pool indexes in groups of one dtype whose `rows` rows stay under GROUP_BYTES
    (one pool at least per group): each group travels as one contiguous message, the pools' rows
    one after the other. Both ends compute the same groups from the same pools and row count."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(pools):
        b = rows * p[0].numel() * p.element_size()
        if groups[-1] and (size + b > GROUP_BYTES or p.dtype != pools[groups[-1][0]].dtype):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    return groups


def _flat_views(
    pools: list[torch.Tensor], group: list[int], rows: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A group's message buffer and, inside it, one [rows, ...] view per pool of the group."""
    first = pools[group[0]]
    flat = torch.empty(sum(rows * pools[i][0].numel() for i in group), dtype=first.dtype, device=first.device)
    views, off = [], 0
    for i in group:
        n = rows * pools[i][0].numel()
        views.append(flat[off : off + n].view(rows, *pools[i].shape[1:]))
        off += n
    return flat, views


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class _Ends:
    def __init__(self, pools: list[torch.Tensor], kind: str):
        self.pools = pools
        self.device = pools[0].device
        self._kind = kind
        self._workers: dict[int, _PeerWorker] = {}
        self.bytes_moved = 0
        # transfers completed and the seconds their workers spent in them (first op to the end of
        # the last, the peer's wait included): bytes_moved / busy_s is the rate they achieved
        self.transfers = 0
        self.busy_s = 0.0

    def summary(self) -> str:
        """For the engine's progress line."""
        if not self.transfers:
            return ""
        rate = self.bytes_moved / self.busy_s / 1e9 if self.busy_s else 0.0
        return (
            f"; KV {self._kind} {self.transfers} transfers, {self.bytes_moved / 1e6:.1f} MB, "
            f"{1e3 * self.busy_s / self.transfers:.2f} ms each, {rate:.1f} GB/s while busy"
        )

    def _worker(self, peer: int) -> _PeerWorker:
        if peer not in self._workers:
            self._workers[peer] = _PeerWorker(f"kv-{self._kind}-{peer}", self.device)
        return self._workers[peer]

    def _queue(self, peer: int, t: Transfer, op, batch_op=None, rows: int = 0) -> None:
        """`op(buf, peer, i)` for each of the transfer's buffers in order (gloo), or, on CUDA,
        `batch_op(k, group, peer)` for each group `k` of `_groups`: one NCCL message per group
        instead of one per layer."""
        # the buffers were written on the engine thread's stream: the worker's current stream is
        # another, so it waits for an event recorded there
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()

        def job() -> None:
            try:
                if ready is not None:
                    ready.synchronize()
                t0 = time.perf_counter()
                if batch_op is None:
                    for i, b in enumerate(t.bufs):
                        op(b, peer, i)
                else:
                    for k, group in enumerate(_groups(self.pools, rows)):
                        batch_op(k, group, peer)
                _sync(self.device)
                self.busy_s += time.perf_counter() - t0
                self.transfers += 1
            except BaseException as exc:  # noqa: BLE001 - the peer died: the engine reports it
                t.error = exc
            t.done.set()

        self._worker(peer).put(job)


class KVSender(_Ends):
    """The prefill engine's end. `send` queues a transfer: the peer's worker gathers each pool's
    rows of the positions and sends them; under gloo one pool at a time, on CUDA gathered into one
    contiguous message per group of pools of up to GROUP_BYTES (one group's copy in memory at a
    time, never the request's whole KV beyond that). The caller keeps the slots unwritten until
    `done`."""

    def __init__(self, pools: list[torch.Tensor]):
        super().__init__(pools, "send")

    def send(self, dest: int, seq: int, kv_slots: tuple[int, ...]) -> Transfer:
        idx = torch.tensor(kv_slots, dtype=torch.long, device=self.device)
        t = Transfer(self.pools, threading.Event())
        pools = self.pools

        def batch(k: int, group: list[int], peer: int) -> None:
            flat, views = _flat_views(pools, group, len(kv_slots))
            for i, view in zip(group, views, strict=True):
                torch.index_select(pools[i], 0, idx, out=view)
            dist.send(flat, dst=peer)

        self._queue(
            dest,
            t,
            lambda pool, peer, i: dist.send(pool.index_select(0, idx), dst=peer, tag=_tag(seq, i)),
            batch if self.device.type == "cuda" else None,
            len(kv_slots),
        )
        self.bytes_moved += len(kv_slots) * bytes_per_token(self.pools)
        return t

    @staticmethod
    def done(t: Transfer) -> bool:
        return t.done.is_set()

    @staticmethod
    def failure(t: Transfer) -> BaseException | None:
        return t.error


class KVReceiver(_Ends):
    """The decode engine's end: `start` queues the receives of a transfer into fresh buffers,
    `done` polls it, `store` copies a received transfer into the cache's slots."""

    def __init__(self, pools: list[torch.Tensor]):
        super().__init__(pools, "recv")

    def start(self, source: int, seq: int, n: int) -> Transfer:
        flats: list[torch.Tensor] = []
        if self.device.type == "cuda":  # one message per group: the pools' buffers are views into it
            bufs: list[torch.Tensor] = []
            for group in _groups(self.pools, n):
                flat, views = _flat_views(self.pools, group, n)
                flats.append(flat)
                bufs += views
        else:
            bufs = [torch.empty((n, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in self.pools]
        t = Transfer(bufs, threading.Event())

        def batch(k: int, group: list[int], peer: int) -> None:
            dist.recv(flats[k], src=peer)

        self._queue(
            source,
            t,
            lambda b, peer, i: dist.recv(b, src=peer, tag=_tag(seq, i)),
            batch if self.device.type == "cuda" else None,
            n,
        )
        self.bytes_moved += sum(b.numel() * b.element_size() for b in bufs)
        return t

    @staticmethod
    def done(t: Transfer) -> bool:
        return t.done.is_set()

    def store(self, t: Transfer, kv_slots: list[int]) -> None:
        """Raises what the transfer failed with (a peer's death)."""
        if t.error is not None:
            raise t.error
        idx = torch.tensor(kv_slots, dtype=torch.long, device=self.device)
        for p, b in zip(self.pools, t.bufs, strict=True):
            p.index_copy_(0, idx, b)
