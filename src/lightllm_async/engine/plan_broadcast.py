"""The step record across hosts: the same bytes as the shared-memory channel (ipc/steps.py),
broadcast from rank 0 over a gloo group of the engine's ranks (CPU tensors, TCP), so a rank on
another host follows rank 0 exactly as a local one does. Used for every follower when the ranks
span several nodes (`--nnodes` > 1).

Rank 0 broadcasts the record's length, then its bytes; a follower blocks in the broadcast until
the next record comes. When a peer dies the broadcast raises (the connection closes), which ends
the rank: the server (or the node's supervisor) sees it exit. An idle rank 0 broadcasts a length
of 0 (a keepalive) every KEEPALIVE_S: without it rank 0 would touch no connection to a peer host
until the next request, and a peer host's death would leave node 0 serving, its /health green.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lightllm_async.batch import Batch
from lightllm_async.ipc.steps import decode, encode, encode_stop
from lightllm_async.types import SamplingParams

KEEPALIVE_S = 0.5  # an idle rank 0 tells its followers it is there this often


class BroadcastWriter:
    def __init__(self, group, record_bytes: int):
        self.group = group
        self.buf = torch.empty(record_bytes, dtype=torch.uint8)
        self.size = torch.zeros(1, dtype=torch.int64)
        self.announced: dict[int, SamplingParams] = {}
        self.sent_at = time.monotonic()

    def publish(self, batch: Batch) -> None:
        self._send(encode(batch, self.announced, self.buf.numpy(), 0, self.buf.numel()))

    def stop(self) -> None:
        self._send(encode_stop(self.buf.numpy(), 0))

    def idle(self) -> None:
        """A keepalive, when nothing went out for KEEPALIVE_S; raises when a follower's host is gone."""
        if time.monotonic() - self.sent_at >= KEEPALIVE_S:
            self._send(0)

    def _send(self, n: int) -> None:
        self.size[0] = n
        dist.broadcast(self.size, src=0, group=self.group)
        if n:
            dist.broadcast(self.buf[:n], src=0, group=self.group)
        self.sent_at = time.monotonic()


class BroadcastReader:
    def __init__(self, group, record_bytes: int):
        self.group = group
        self.buf = torch.empty(record_bytes, dtype=torch.uint8)
        self.size = torch.zeros(1, dtype=torch.int64)
        self.known: dict[int, SamplingParams] = {}

    def next(self, timeout: float | None = None) -> Batch | None:
        """The next record's batch (None: rank 0 stopped); TimeoutError for rank 0's keepalive
        (it is idle, with nothing in flight: the follower's idle checks run). Blocks until one of
        them comes: `timeout` is not honoured (a broadcast cannot be left half-way); a dead
        rank 0 makes it raise."""
        dist.broadcast(self.size, src=0, group=self.group)
        n = int(self.size[0])
        if n == 0:
            raise TimeoutError("rank 0 is idle")
        part = self.buf[:n]
        dist.broadcast(part, src=0, group=self.group)
        return decode(part.numpy(), 0, self.known)
