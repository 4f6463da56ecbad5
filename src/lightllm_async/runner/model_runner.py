"""Runs a scheduled `Batch` through the model and samples: the only place the engine touches torch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightllm_async.batch import Batch, Sampled
from lightllm_async.config import EngineConfig, ModelConfig
from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM
from lightllm_async.models.loader import count_weights, iter_weights, load_model_config
from lightllm_async.models.weights import load_weights, random_weights
from lightllm_async.runner.cuda_graph import DecodeGraphs
from lightllm_async.runner.inputs import flatten
from lightllm_async.runner.sampler import sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepHandle:
    """A launched step: its sampled tokens (pinned host memory on CUDA) and the event marking them."""

    tokens: Tensor
    done: torch.cuda.Event | None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, model_cfg: ModelConfig) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = model_cfg.torch_dtype.replace("torch.", "")
    return torch.float16 if stored == "float16" else torch.bfloat16


def kv_cache_tokens(cfg: EngineConfig, model_cfg: ModelConfig, dtype, device: torch.device) -> int:
    """Token slots for the KV cache: set by the CLI, or what memory allows."""
    if cfg.kv_cache_tokens > 0:
        return cfg.kv_cache_tokens
    per_token = KVCache.bytes_per_token(model_cfg, dtype)
    if device.type == "cpu":
        budget = 2 << 30  # 2 GiB of host memory by default
    else:
        free, total = torch.cuda.mem_get_info(device)
        # Prefill activations, then the graph pool's logits and activations at the largest batch.
        activations = 2 * cfg.max_num_batched_tokens * model_cfg.intermediate_size * 4 * 4
        activations += cfg.max_running_requests * (model_cfg.vocab_size + 4 * model_cfg.intermediate_size) * 8
        budget = int(free - (1.0 - cfg.gpu_memory_utilization) * total) - activations
    tokens = min(budget // per_token, cfg.max_running_requests * cfg.max_model_len)
    return max(int(tokens), cfg.max_model_len)


class ModelRunner:
    """Owns the weights, the KV cache and the request-to-token table on one device."""

    def __init__(self, cfg: EngineConfig, progress: Callable[[int, int], None] | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model_cfg = load_model_config(cfg.model_path)
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.model_cfg)
        torch.manual_seed(cfg.seed)
        self.model = self._load_model(progress)
        self.num_kv_tokens = kv_cache_tokens(cfg, self.model_cfg, self.dtype, self.device)
        # One extra cache row and one extra table row: the sink that CUDA-graph padding writes to.
        self.kv = KVCache.allocate(self.model_cfg, self.num_kv_tokens + 1, self.dtype, self.device)
        self.req_to_token = torch.zeros(
            (cfg.max_running_requests + 1, cfg.max_model_len), dtype=torch.int32, device=self.device
        )
        log.info(
            "KV cache: %d token slots (%.2f GiB)",
            self.num_kv_tokens,
            self.num_kv_tokens * KVCache.bytes_per_token(self.model_cfg, self.dtype) / 2**30,
        )
        self._last_sampled = torch.empty(0, dtype=torch.int64, device=self.device)
        self._last_index: dict[int, int] = {}
        if self.device.type == "cuda":  # two, because step N+1 is launched before N is collected
            self._pinned = [
                torch.empty(cfg.max_running_requests, dtype=torch.int64, pin_memory=True) for _ in range(2)
            ]
            self._flip = 0
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not cfg.disable_cuda_graph:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv,
                self.req_to_token,
                cfg.max_running_requests,
                pad_slot=self.num_kv_tokens,
                pad_row=cfg.max_running_requests,
            )
            self.graphs.capture()

    def _load_model(self, progress) -> LlamaForCausalLM:
        model = LlamaForCausalLM(self.model_cfg, self.dtype, self.device)
        if self.cfg.load_format == "random":
            load_weights(model, random_weights(self.model_cfg, self.cfg.seed, self.dtype, self.device))
            return model.eval()
        total = count_weights(self.cfg.model_path)

        def counted():
            for i, (name, tensor) in enumerate(iter_weights(self.cfg.model_path, self.dtype), 1):
                yield name, tensor.to(self.device)
                if progress is not None:
                    progress(i, total)

        load_weights(model, counted())
        return model.eval()

    def execute(self, batch: Batch) -> Sampled:
        """Run one step and wait for its tokens."""
        return self.collect(self.launch(batch))

    def launch(self, batch: Batch) -> StepHandle:
        """Enqueue a step on the device and return without waiting for it.

        Inputs marked PENDING_TOKEN are the previous launch's samples, taken on the device, so the
        engine can schedule step N+1 while step N still runs."""
        input_ids, ctx = self._prepare(batch)
        if self.graphs is not None and batch.decode_only and self.graphs.can_run(len(batch.items)):
            logits = self.graphs.run(input_ids, ctx)  # [B, V]
        else:
            logits = self.model(input_ids, ctx, self.kv)  # [S, V]
        items = [it for it in batch.items if it.samples]
        tokens = sample(logits, [it.params for it in items], [it.num_output for it in items])  # [S]
        self._last_sampled = tokens
        self._last_index = {it.slot: i for i, it in enumerate(items)}
        if self.device.type != "cuda":
            return StepHandle(tokens, None)
        self._flip ^= 1
        host = self._pinned[self._flip][: len(items)]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepHandle(host, done)

    @staticmethod
    def collect(handle: StepHandle) -> Sampled:
        """The step's sampled tokens: the one host sync of a step."""
        if handle.done is not None:
            handle.done.synchronize()
        return Sampled(token_ids=tuple(handle.tokens.tolist()))

    def _prepare(self, batch: Batch) -> tuple[Tensor, ForwardContext]:
        """Flatten the batch, upload it in one host-to-device copy, and fill req_to_token."""
        values, sizes = flatten(batch, self._last_index).packed()
        packed = torch.tensor(
            values,
            dtype=torch.int64,
            pin_memory=self.device.type == "cuda",  # async: never waits
        ).to(self.device, non_blocking=True)
        ids, pos, slots, token_rows, rows, q_start, seq_lens, logits_idx, pend_pos, pend_src = packed.split(
            sizes
        )
        if pend_pos.numel():
            ids[pend_pos] = self._last_sampled.index_select(0, pend_src)
        self.req_to_token[token_rows, pos] = slots.to(torch.int32)
        ctx = ForwardContext(
            positions=pos,
            kv_slots=slots,
            req_to_token=self.req_to_token,
            req_idx=rows.to(torch.int32),
            q_start=q_start.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            logits_idx=logits_idx,
            decode_only=batch.decode_only,
        )
        return ids, ctx
