"""Decode steps on the CPU: batched attention over padded context rows, and, with `--cpu-compile`,
the layers of the step compiled by torch.compile (inductor's C++ backend) into one graph.

Eager, a 30-layer decode step is ~700 Python-dispatched ops; the compiled step fuses the norms,
rope, the SiLU gate and the dtype conversions around the weight-only matmuls into a few C++
loops and runs the whole stack with one call. Shapes are dynamic (batch and context length vary
per step), so two graphs serve every step: batch 1 and larger batches (torch specializes sizes
0 and 1), each with a mask over the padded contexts. They are compiled at start, on padding
rows, before the engine reports ready; inductor's on-disk cache makes a later start quicker.
The LM head stays eager (its kernel choice depends on the rows).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM
from lightllm_async.runner.inputs import InputBuffers

log = logging.getLogger(__name__)

_WARM_LEN = 7  # the context length of the compiling steps


def _guard_options() -> dict:
    """Leave out the guards on the model's modules and parameters, which are fixed once loaded:
    checking them all cost ~1.4 ms a step (torch >= 2.8 has the filter; older ones keep them)."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {"guard_filter_fn": skip} if skip is not None else {}


class CpuDecode:
    """Runs the decode-only steps of a Llama-family model on the CPU."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, compile_step: bool):
        self.model, self.kv, self.compiled = model, kv, compile_step
        self.hidden = model.hidden
        if compile_step:
            self.hidden = torch.compile(model.hidden, dynamic=True, options=_guard_options())

    def forward(self, input_ids: Tensor, ctx: ForwardContext) -> Tensor:
        """Logits [S, V] float32 of a decode-only step."""
        with torch.inference_mode():
            # a tensor of its own: a step's ids are a view whose base differs from the warm-up's,
            # and dynamo guards on the base (a recompile at the first real step)
            ids = input_ids.clone() if self.compiled else input_ids
            x = self.hidden(ids, ctx.with_decode_rows(always_mask=self.compiled), self.kv)  # [S, H]
            return self.model.head_logits(x)

    def warm_up(self, inputs: InputBuffers, max_batch: int) -> None:
        """Compile the two graphs a server meets, batch 1 and larger batches, on padding rows
        that read and write only the sink slot of the KV cache. The sizes here are none of 0, 1
        or each other's (torch specializes a graph on those), so that one graph serves every
        context length and every batch above 1."""
        if not self.compiled:
            return
        start = time.perf_counter()
        inputs.req_to_token[inputs.sink_row, :_WARM_LEN] = inputs.sink_slot
        for batch in sorted({1, min(3, max_batch)}):
            inputs.load_padding(batch)
            lens = (_WARM_LEN,) + (_WARM_LEN - 2,) * (batch - 1)
            ctx = inputs.context(batch, batch, batch, decode_only=True, host_seq_lens=lens)
            self.forward(inputs.input_ids[:batch], ctx)
        log.info(
            "compiled the CPU decode step (torch.compile, inductor) in %.1f s", time.perf_counter() - start
        )
