"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

All graphs draw on one memory pool and read the runner's `InputBuffers`: each graph was captured
on the leading slices of those buffers, which every step's single upload fills, so a replay reads
its inputs in place. Capturing from the largest bucket down lets every smaller graph reuse the
blocks the larger ones freed, so many graphs cost little more than the largest (the role LightLLM's
CacheTensorManager plays). A batch is padded to the next bucket when it is uploaded: padding rows
write their k/v into a sink slot of the KV cache that no request owns, and attend over that one
slot, so they never touch real requests.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from lightllm_async.batch import Batch
from lightllm_async.models.llama import KVCache, LlamaForCausalLM
from lightllm_async.runner.inputs import InputBuffers

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """One CUDA graph per bucket, all reading `inputs`; `replay(bucket)` runs the one for a batch
    that `InputBuffers.load(..., pad_to=bucket)` has just uploaded."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, inputs: InputBuffers, max_batch: int):
        self.model, self.kv, self.inputs = model, kv, inputs
        self.buckets = graph_buckets(max_batch)
        # Every graph writes its logits here, so no graph keeps a private output block alive in the
        # pool: each capture can reuse all the memory the larger ones freed.
        self.logits = torch.empty(
            (self.buckets[-1], model.cfg.vocab_size), dtype=torch.float32, device=inputs.req_to_token.device
        )
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self.largest_graph_bytes = 0

    def capture(self) -> None:
        start, base = time.perf_counter(), torch.cuda.memory_reserved()
        # Capture runs the model for real (warm-up and recording): on padding rows only, so it
        # touches nothing but the sink slot.
        self.inputs.load_padding(self.buckets[-1])
        input_ids = self.inputs.input_ids
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                ctx = self.inputs.context(b, b, b, decode_only=True)
                self.model(input_ids[:b], ctx, self.kv)  # compiles kernels, warms allocators
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.logits[:b].copy_(self.model(input_ids[:b], ctx, self.kv))
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

    def bucket_for(self, batch: Batch) -> int | None:
        """The graph size a batch replays with, or None if it runs eagerly."""
        if not batch.decode_only or len(batch.items) > self.buckets[-1]:
            return None
        return next(s for s in self.buckets if s >= len(batch.items))

    def replay(self, bucket: int) -> Tensor:
        """Logits [bucket, V] of the inputs already in the buffers; padding rows last."""
        self.graphs[bucket].replay()
        return self.logits[:bucket]
