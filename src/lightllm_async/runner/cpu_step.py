"""Decode steps on the CPU: batched attention over padded context rows, and, with `--cpu-compile`,
the layers of the step compiled by torch.compile (inductor's C++ backend) into one graph.

Eager, a 30-layer decode step is ~700 Python-dispatched ops; the compiled step fuses the norms,
rope, the SiLU gate and the dtype conversions around the weight-only matmuls into a few C++
loops and runs the whole stack with one call. Shapes are dynamic (batch and context length vary
per step), so a handful of graphs serve every step: batch 1 and larger batches, with and without
padding among the contexts (torch specializes sizes 0 and 1 and the None mask). They are
compiled at start, on padding rows, before the engine reports ready; inductor's on-disk cache
makes a later start quicker. The LM head stays eager (its kernel choice depends on the rows).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM
from lightllm_async.runner.inputs import InputBuffers

log = logging.getLogger(__name__)


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
            x = self.hidden(input_ids, ctx.with_decode_rows(), self.kv)  # [S, H]
            return self.model.head_logits(x)

    def warm_up(self, inputs: InputBuffers, max_batch: int) -> None:
        """Compile the graphs a server meets (batch 1; batch 2 with unequal contexts and equal
        ones), on padding rows that read and write only the sink slot of the KV cache."""
        if not self.compiled:
            return
        start = time.perf_counter()
        for batch in sorted({1, min(2, max_batch)}):
            inputs.load_padding(batch)
            for lens in {(1,) * batch, (1,) * (batch - 1) + (2,)}:
                ctx = inputs.context(batch, batch, batch, decode_only=True, host_seq_lens=lens)
                if max(lens) > 1:  # the second position of the padding row: the sink slot again
                    inputs.req_to_token[inputs.sink_row, 1] = inputs.sink_slot
                self.forward(inputs.input_ids[:batch], ctx)
        log.info(
            "compiled the CPU decode step (torch.compile, inductor) in %.1f s", time.perf_counter() - start
        )
