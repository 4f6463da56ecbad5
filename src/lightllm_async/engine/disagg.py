"""Prefill/decode disaggregation (--pd): the engine's two halves of a handoff. Plain Python; the
KV moves through a sender or receiver (runner/kv_transfer.py) given to it.

The protocol, one writer per field (notes/CONTRACTS.md, "Prefill/decode disaggregation"):
1. The frontend picks a prefill replica P and a decode replica D, writes D into the slot
   (`handoff_to`) and submits the slot to P.
2. P runs the prompt. When the step that finishes it samples the first token, P publishes the
   token (it streams at once), starts sending the KV of every computed position to D (transfer
   number `seq`, counted per (P, D)), records (P, seq) in the slot and moves it RUNNING ->
   HANDOFF. P's scheduler keeps the request's KV slots until the send completed, then frees them.
3. The frontend's reader sees HANDOFF and queues a HANDOFF record on D's ring; D owns the slot.
4. D takes transfers from P strictly in seq order: it reserves KV for the positions, posts the
   receives, and once they complete copies them into the reserved slots, which join its prefix
   cache; the request then resumes (HANDOFF -> RUNNING) and is admitted as a full prefix hit.
   A transfer not complete after TRANSFER_TIMEOUT_S ends its request with an error, releases the
   reservation, and marks P broken (later transfers from P are refused: their order is lost).
Across servers (--role), P and D are the engines of two servers: P's frontend frees the slot at
HANDOFF and the request reaches D's frontend over HTTP (frontend/pd_internal.py), which queues a
slot that D's engine takes over (QUEUED -> HANDOFF, EngineRegion.take_over); from there on, as here.
An abort at any point is the slot's flag: P drops the request while it computes the prompt; D
still receives a transfer that was started (the order needs it), then ends the request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Finished, Scheduler
from lightllm_async.ipc import EngineRegion, HandoffView
from lightllm_async.types import FinishReason

log = logging.getLogger(__name__)

TRANSFER_TIMEOUT_S = 30.0


class Sender(Protocol):
    def send(self, dest: int, seq: int, kv_slots: tuple[int, ...]) -> Any: ...

    def done(self, transfer: Any) -> bool: ...

    def failure(self, transfer: Any) -> BaseException | None: ...


class Receiver(Protocol):
    def start(self, source: int, seq: int, n: int) -> Any: ...

    def done(self, receipt: Any) -> bool: ...

    def store(self, receipt: Any, kv_slots: list[int]) -> None: ...


class PrefillSide:
    """A prefill replica's half: hands finished prompts to their decode replicas.

    A handed-off request keeps its KV slots (`Scheduler.handing_off`) until its send completed:
    nothing overwrites them meanwhile, and admission counts them used, so a decode replica that
    stalls holds back this replica's admissions instead of growing its memory.
    """

    def __init__(self, region: EngineRegion, sender: Sender, rank: int | None = None):
        self.region = region
        self.sender = sender
        self.rank = rank  # in the group (None: the replica index, as under --pd on one host)
        self._next_seq: dict[int, int] = {}  # by decode replica
        self._sending: list[tuple[Any, Request]] = []
        self.sent_tokens = 0  # KV positions handed off

    def hand_off(self, f: Finished) -> None:
        """After the request's first token was published: start sending its KV, give the slot up."""
        req, dest = f.request, f.request.handoff_to
        seq = self._next_seq.get(dest, 0)
        self._next_seq[dest] = seq + 1
        self._sending.append((self.sender.send(dest, seq, f.handoff_kv), req))
        self.region.set_cached_tokens(req.slot, req.cached_tokens or 0)
        self.region.hand_off(req.slot, seq, self.rank)
        self.sent_tokens += len(f.handoff_kv)

    def arrived(self, slot: int, gen: int) -> None:
        log.error("prefill replica got a handoff of slot %d; ignored", slot)

    def summary(self) -> str:
        return getattr(self.sender, "summary", str)()

    def progress(self, engine: Any) -> bool:
        """Give the KV of requests whose send completed back to the scheduler (a failed send means a
        dead decode replica: the server is stopping; the KV is given back all the same)."""
        left, moved = [], False
        for t, req in self._sending:
            if not self.sender.done(t):
                left.append((t, req))
                continue
            if (err := self.sender.failure(t)) is not None:
                log.error("KV send of slot %d to replica %d failed: %r", req.slot, req.handoff_to, err)
            engine.scheduler.release_handoff(req)
            moved = True
        self._sending = left
        return moved

    @property
    def busy(self) -> bool:
        return bool(self._sending)


@dataclass
class _Transfer:
    view: HandoffView
    kv_slots: list[int]
    receipt: Any
    deadline: float


class DecodeSide:
    """A decode replica's half: receives handed-off requests in order, then admits them."""

    def __init__(
        self,
        region: EngineRegion,
        scheduler: Scheduler,
        receiver: Receiver,
        timeout: float = TRANSFER_TIMEOUT_S,
    ):
        self.region = region
        self.scheduler = scheduler
        self.receiver = receiver
        self.timeout = timeout
        self._queued: dict[int, dict[int, HandoffView]] = {}  # by source, by seq
        self._next_seq: dict[int, int] = {}  # by source
        self._transfers: list[_Transfer] = []
        self._broken: set[int] = set()
        self.received_tokens = 0  # KV positions received

    def arrived(self, slot: int, gen: int) -> None:
        view = self.region.read_handoff(slot, gen)
        if view is None:  # cannot be: the slot is in HANDOFF until this replica moves it
            log.error("handoff of slot %d gen %d: the slot is not in HANDOFF", slot, gen)
            return
        self._queued.setdefault(view.source, {})[view.seq] = view

    @property
    def busy(self) -> bool:
        return bool(self._transfers) or any(self._queued.values())

    def summary(self) -> str:
        return getattr(self.receiver, "summary", str)()

    @property
    def reserved_tokens(self) -> int:
        return sum(len(t.kv_slots) for t in self._transfers)

    def progress(self, engine: Any, now: float | None = None) -> bool:
        """Start the transfers that are next in order and fit; finish those that completed or
        timed out. True if anything moved."""
        now = time.monotonic() if now is None else now
        moved = self._start(engine, now)
        left = []
        for t in self._transfers:
            if self.receiver.done(t.receipt):
                self._received(engine, t)
                moved = True
            elif now > t.deadline:
                self._give_up(engine, t)
                moved = True
            else:
                left.append(t)
        self._transfers = left
        return moved

    def _start(self, engine: Any, now: float) -> bool:
        moved = False
        kv = self.scheduler.kv
        for source, queued in self._queued.items():
            while (view := queued.get(self._next_seq.get(source, 0))) is not None:
                if source in self._broken:
                    engine.end_request(view.slot, FinishReason.ERROR)
                elif kv.num_free < view.num_kv:
                    break  # the reservation waits for running requests to free KV
                else:
                    slots = kv.allocate(view.num_kv)  # reserved before the receive starts
                    receipt = self.receiver.start(source, view.seq, view.num_kv)
                    self._transfers.append(_Transfer(view, slots, receipt, now + self.timeout))
                del queued[view.seq]
                self._next_seq[source] = view.seq + 1
                moved = True
        return moved

    def _received(self, engine: Any, t: _Transfer) -> None:
        v = t.view
        try:
            self.receiver.store(t.receipt, t.kv_slots)
        except Exception as exc:  # noqa: BLE001 - the prefill replica died mid-transfer
            log.error("KV transfer of slot %d from replica %d failed: %r", v.slot, v.source, exc)
            self._broken.add(v.source)
            self.scheduler.tokens.free(t.kv_slots)
            engine.end_request(v.slot, FinishReason.ERROR)
            return
        self.received_tokens += len(t.kv_slots)
        if self.region.is_aborted(v.slot):
            self.scheduler.tokens.free(t.kv_slots)
            engine.end_request(v.slot, FinishReason.ABORT)
            return
        req = Request(
            slot=v.slot,
            gen=v.gen,
            prompt_ids=v.prompt_ids,
            params=v.params,
            arrival=engine.next_arrival(),
            output_ids=list(v.output_ids),
            cached_tokens=v.cached_tokens,
        )
        engine.admit_transferred(req, t.kv_slots)

    def _give_up(self, engine: Any, t: _Transfer) -> None:
        v = t.view
        log.error(
            "KV transfer of slot %d from replica %d did not complete in %.0f s; replica %d is no "
            "longer trusted", v.slot, v.source, self.timeout, v.source,
        )  # fmt: skip
        self._broken.add(v.source)
        self.scheduler.tokens.free(t.kv_slots)  # the receive buffers are apart from the cache
        engine.end_request(v.slot, FinishReason.ERROR)
