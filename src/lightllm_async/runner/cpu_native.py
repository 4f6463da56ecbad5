"""The CPU decode step in C (`csrc/decode_step.c`, in the `_gemv` extension): one call a step for a
Llama-family model whose linear layers are all `Int4Linear`s run by `_gemv`.

The eager step dispatches ~700 torch ops a token and the compiled one ~150 custom-op calls plus
its graph; here the 30 layers, the final norm and the int8 LM head are one C call that reads the
weights, the KV cache and the request-to-token table in place through their addresses (nothing
is copied per step), with the GIL released. Its arithmetic and bfloat16 roundings are the eager
path's (see the C file), so its logits follow the eager packed step's up to the order of float32
sums (tests/test_cpu_native.py states the tolerance).

Threads: `threads - 1` C workers share each phase's units (output tiles, attention heads) with
the engine thread; a thread with nothing to claim spins at most `spin_us` microseconds and then
sleeps, so it gives a busy core back, and nobody waits for an idle or descheduled worker.
`step_threads`: `--cpu-threads` where given, else the engine's torch threads and one more (the
torch threads leave a core to the frontend; a C worker takes that core only while it is free:
measured against one thread, quiet and with a core busy, in perf/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightllm_async.config import EngineConfig
from lightllm_async.kernels import cpu_gemv
from lightllm_async.layers.quantized import Int4Linear, Int8Head
from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM

SPIN_US = 5  # how long a waiting C thread spins before it sleeps (perf/RESULTS.md: 5 against 10, 30, 200)


def step_threads(cfg: EngineConfig) -> int:
    """The C step's threads: `--cpu-threads`, else the engine's torch threads (the cores left after
    the frontend, shared by `--dp` replicas: engine/process.py) and one more, the frontend's core."""
    return cfg.cpu_threads if cfg.cpu_threads > 0 else torch.get_num_threads() + 1


def unsupported(model: LlamaForCausalLM, kv: KVCache) -> str | None:
    """Why the C step cannot run this model (None: it can)."""
    if cpu_gemv.native is None or not hasattr(cpu_gemv.native, "decode_step"):
        return "the _gemv extension is not built with the decode step"
    if type(model) is not LlamaForCausalLM or model.tp.size > 1:
        return "not a one-rank Llama-family model"
    if model.embed.weight.dtype not in (torch.bfloat16, torch.float32):
        return f"dtype {model.embed.weight.dtype}"
    for layer in model.layers:
        for lin in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
            if not isinstance(lin, Int4Linear) or not lin.gemv or lin.bias is not None:
                return "a linear layer that is not int4-packed for _gemv (or has a bias)"
    if kv.k[0].dtype != model.embed.weight.dtype:
        return "a KV cache of another dtype than the activations"
    return None


class NativeDecode:
    """Decode-only steps of an int4-packed Llama-family model by `_gemv.decode_step`."""

    compiled = False  # (CpuDecode's flag: this step is not torch.compile's)

    def __init__(
        self, model: LlamaForCausalLM, kv: KVCache, req_stride: int, threads: int, spin_us: int = SPIN_US
    ):
        why = unsupported(model, kv)
        if why is not None:
            raise ValueError(f"the C decode step cannot run this model: {why}")
        cfg, attn = model.cfg, model.layers[0].attn
        head = model.lm_head
        self.int8_head = isinstance(head, Int8Head) and head.gemv
        self.model, self.threads = model, threads
        self.hidden_size, self.vocab = cfg.hidden_size, cfg.vocab_size
        ptrs = [
            model.embed.weight.data_ptr(),
            model.norm.weight.data_ptr(),
            head.gemv_w.data_ptr() if self.int8_head else 0,
            head.gemv_scale.data_ptr() if self.int8_head else 0,
            model.cos_sin.data_ptr(),
        ]
        for layer, k, v in zip(model.layers, kv.k, kv.v, strict=True):
            a, m = layer.attn, layer.mlp
            ptrs += [layer.input_norm.weight.data_ptr(), a.qkv.gemv_w.data_ptr(), a.qkv.gemv_sm.data_ptr()]
            ptrs += [a.o_proj.gemv_w.data_ptr(), a.o_proj.gemv_sm.data_ptr()]
            ptrs += [
                layer.post_norm.weight.data_ptr(),
                m.gate_up.gemv_w.data_ptr(),
                m.gate_up.gemv_sm.data_ptr(),
            ]
            ptrs += [m.down.gemv_w.data_ptr(), m.down.gemv_sm.data_ptr(), k.data_ptr(), v.data_ptr()]
        bf16 = int(model.embed.weight.dtype == torch.bfloat16)
        dims = (
            cfg.num_layers, cfg.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
            cfg.intermediate_size, cfg.vocab_size, req_stride, bf16, threads, spin_us,
            model.cos_sin.shape[0], kv.k[0].shape[0],
        )  # fmt: skip
        self._kv = kv  # the addresses above must stay valid: hold what they point into
        floats = (float(cfg.rms_norm_eps), float(attn.scale))
        self._handle = cpu_gemv.native.decode_model_new(dims, floats, ptrs)

    def forward(self, input_ids: Tensor, ctx: ForwardContext) -> Tensor:
        """Logits [S, V] float32 of a decode-only step (S = its requests, each sampling)."""
        b = input_ids.shape[0]
        if not ctx.decode_only or ctx.req_to_token.stride(0) != ctx.req_to_token.shape[1]:
            raise ValueError("the C decode step runs decode-only steps over a contiguous req_to_token")
        tensors = (input_ids, ctx.positions, ctx.kv_slots, ctx.req_idx, ctx.seq_lens)
        if any(not t.is_contiguous() for t in tensors):
            raise ValueError("the C decode step reads contiguous index tensors")
        every_row = ctx.logits_idx.shape[0] == b  # decode-only: every request samples, in order
        with torch.inference_mode():
            hidden = torch.empty(b, self.hidden_size) if not (self.int8_head and every_row) else None
            logits = torch.empty(b, self.vocab) if self.int8_head and every_row else None
            cpu_gemv.native.decode_step(
                self._handle, b, input_ids.data_ptr(), ctx.positions.data_ptr(), ctx.kv_slots.data_ptr(),
                ctx.req_to_token.data_ptr(), ctx.req_idx.data_ptr(), ctx.seq_lens.data_ptr(),
                0 if hidden is None else hidden.data_ptr(), 0 if logits is None else logits.data_ptr(),
            )  # fmt: skip
            if logits is not None:
                return logits
            x = hidden.index_select(0, ctx.logits_idx).to(self.model.embed.weight.dtype)
            return self.model.head_logits(x)
