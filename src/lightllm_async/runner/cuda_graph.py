"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

All graphs draw on one memory pool and read one set of maximum-size input buffers. Capturing
from the largest bucket down lets every smaller graph reuse the blocks the larger ones freed, so
many graphs cost little more than the largest (the role LightLLM's CacheTensorManager plays).
A batch is padded to the next bucket: padding rows write their k/v into a sink row of the KV
cache that no request owns, and attend over that one row, so they never touch real requests.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """One CUDA graph per bucket; `run` pads a decode batch, copies its inputs in and replays."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KVCache,
        req_to_token: Tensor,
        max_batch: int,
        pad_slot: int,
        pad_row: int,
    ):
        self.model, self.kv, self.req_to_token = model, kv, req_to_token
        self.buckets = graph_buckets(max_batch)
        dev, n = req_to_token.device, self.buckets[-1]
        self.pad_slot, self.pad_row = pad_slot, pad_row
        req_to_token[pad_row, 0] = pad_slot
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.kv_slots = torch.full((n,), pad_slot, dtype=torch.int64, device=dev)
        self.req_idx = torch.full((n,), pad_row, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.q_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_idx = torch.arange(n, dtype=torch.int64, device=dev)
        # Every graph writes its logits here, so no graph keeps a private output block alive in the
        # pool: each capture can reuse all the memory the larger ones freed.
        self.logits = torch.empty((n, model.cfg.vocab_size), dtype=torch.float32, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self.largest_graph_bytes = 0

    def _ctx(self, b: int) -> ForwardContext:
        return ForwardContext(
            positions=self.positions[:b],
            kv_slots=self.kv_slots[:b],
            req_to_token=self.req_to_token,
            req_idx=self.req_idx[:b],
            q_start=self.q_start[: b + 1],
            seq_lens=self.seq_lens[:b],
            logits_idx=self.logits_idx[:b],
            decode_only=True,
        )

    def capture(self) -> None:
        start, base = time.perf_counter(), torch.cuda.memory_reserved()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                ctx = self._ctx(b)
                self.model(self.input_ids[:b], ctx, self.kv)  # compiles kernels, warms allocators
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.logits[:b].copy_(self.model(self.input_ids[:b], ctx, self.kv))
                self.graphs[b] = graph
                if b == self.buckets[-1]:
                    torch.cuda.synchronize()
                    self.largest_graph_bytes = torch.cuda.memory_reserved() - base
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved() - base
        log.info(
            "captured %d CUDA graphs (batch 1..%d) in %.1f s: %.1f MiB, %.1f MiB beyond the largest",
            len(self.graphs),
            self.buckets[-1],
            time.perf_counter() - start,
            self.memory_bytes / 2**20,
            (self.memory_bytes - self.largest_graph_bytes) / 2**20,
        )

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, input_ids: Tensor, ctx: ForwardContext) -> Tensor:
        """Replay the graph of the smallest bucket that holds the batch; logits [B, V]."""
        b = input_ids.shape[0]
        bucket = next(s for s in self.buckets if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(ctx.positions)
        self.kv_slots[:b].copy_(ctx.kv_slots)
        self.req_idx[:b].copy_(ctx.req_idx)
        self.seq_lens[:b].copy_(ctx.seq_lens)
        if bucket > b:  # padding rows: the sink slot, the sink row, one token of context
            self.kv_slots[b:bucket].fill_(self.pad_slot)
            self.req_idx[b:bucket].fill_(self.pad_row)
            self.seq_lens[b:bucket].fill_(1)
            self.positions[b:bucket].zero_()
        self.graphs[bucket].replay()
        return self.logits[:b]
