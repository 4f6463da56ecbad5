"""Runs a scheduled `Batch` through the model and samples: the only place the engine touches torch."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lightllm_async.batch import (
    Batch,
    DeviceFailure,
    Sampled,
    StepLogprobs,
    max_prefix_slots,
    sampling_slots,
)
from lightllm_async.config import EngineConfig, ModelConfig
from lightllm_async.kernels import cpu_gemv
from lightllm_async.layers.parallel import SINGLE, TPGroup
from lightllm_async.layers.quantized import Int8Head, pack_int8_head, swap_int4_linears
from lightllm_async.models.deepseek import DeepseekForCausalLM, MLAKVCache
from lightllm_async.models.llama import KVCache, LlamaForCausalLM
from lightllm_async.models.loader import count_weights, int4_weights, is_gguf, iter_weights, load_model_config
from lightllm_async.models.weights import load_weights, random_weights
from lightllm_async.runner import cpu_native, weight_cache
from lightllm_async.runner.cpu_native import NativeDecode
from lightllm_async.runner.cpu_step import CpuDecode
from lightllm_async.runner.cuda_graph import DecodeGraphs
from lightllm_async.runner.distributed import with_small_all_reduce
from lightllm_async.runner.inputs import InputBuffers
from lightllm_async.runner.logprobs import compute_logprobs
from lightllm_async.runner.piecewise import PiecewiseGraphs
from lightllm_async.runner.sampler import sample
from lightllm_async.types import MAX_TOP_LOGPROBS, PROMPT_LOGPROB_TOKENS_PER_STEP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepHandle:
    """A launched step: its sampled tokens and log-probabilities (pinned host memory on CUDA)
    and the event marking them."""

    tokens: Tensor
    done: torch.cuda.Event | None
    logprobs: tuple[Tensor, Tensor, Tensor] | None = None  # chosen [L], top ids [L, k], top [L, k]
    began: torch.cuda.Event | None = None  # LLA_STEP_TIMING=1: reached when the step's work starts


class StepTimes:
    """LLA_STEP_TIMING=1 (CUDA): the device's own clock around each step, from timing events: how
    long a step's work took on the device (its inputs' copies to its tokens' copy back), and how
    long the device sat idle before it (its launch came after the step before had finished).
    For finding where a step's time goes; off by default (timing events cost a little)."""

    def __init__(self):
        self.last_done: torch.cuda.Event | None = None
        self.totals = [0, 0.0, 0.0]  # steps, busy ms, idle ms

    def collected(self, handle: StepHandle) -> None:
        self.totals[0] += 1
        self.totals[1] += handle.began.elapsed_time(handle.done)
        if self.last_done is not None:
            self.totals[2] += max(0.0, self.last_done.elapsed_time(handle.began))
        self.last_done = handle.done

    def summary(self) -> str:
        """'; device ms/step busy/idle B/I' since the last summary ('' if no step)."""
        steps, busy, idle = self.totals
        self.totals = [0, 0.0, 0.0]
        return f"; device ms/step busy/idle {busy / steps:.2f}/{idle / steps:.2f}" if steps else ""


def model_family(model_cfg: ModelConfig) -> tuple[type, type]:
    """(model class, KV cache class) of an architecture: DeepSeek's MLA, or the Llama family."""
    if model_cfg.is_deepseek:
        return DeepseekForCausalLM, MLAKVCache
    return LlamaForCausalLM, KVCache


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_quantization(cfg: EngineConfig, device: torch.device) -> dict[str, str]:
    """The parameters to keep packed in 4 bits, `{param: GGUF type}`; empty: all dequantized.

    torch's int4 weight-only kernel is a CPU one, and runs 2.6-7.5x as fast as a float32 GEMV at
    decode (perf/cpu_linear_bench.py), so "auto" packs a GGUF's 4-bit weights on the CPU only, and
    with one rank (the packed layers are not sharded for --tp)."""
    if cfg.quantization == "none" or (cfg.quantization == "auto" and cfg.tp_size > 1):
        return {}
    if cfg.tp_size > 1:
        raise ValueError("quantization int4 is not available with --tp > 1 (packed layers are not sharded)")
    packed = {} if cfg.load_format == "random" else int4_weights(cfg.model_path)
    if cfg.quantization == "auto":
        return packed if device.type == "cpu" else {}
    if cfg.quantization != "int4":
        raise ValueError(f"quantization {cfg.quantization!r}: expected auto, none or int4")
    if device.type != "cpu":
        raise ValueError("quantization int4 runs on the CPU only (torch's CPU int4 kernel)")
    if not packed:
        raise ValueError(f"quantization int4: {cfg.model_path} has no 4-bit GGUF weights (Q4_0, Q4_1, Q4_K)")
    return packed


def resolve_dtype(
    name: str, device: torch.device, model_cfg: ModelConfig, packed: bool = False
) -> torch.dtype:
    """`packed`: 4-bit weights kept packed, whose kernel runs in bfloat16 (float32 is its slow path)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if packed else torch.float32
    stored = model_cfg.torch_dtype.replace("torch.", "")
    return torch.float16 if stored == "float16" else torch.bfloat16


# Memory kept free for activations when the KV cache is sized from free GPU memory. The cache is
# allocated after the weights and before any step has run, so these are estimates, on the generous
# side: an overestimate costs a few KV slots, an underestimate crashes the first big step.
_ACT_ITEMSIZE = 4  # activations may be fp32 (--dtype float32); bf16/fp16 halves the need
# Eager prefill of T tokens peaks in the MLP: gate_up's [T, 2I] output and silu_and_mul's [T, I]
# product are alive together (3 T·I values). We reserve 8 T·I: the remainder covers the
# down-projection's output, the attention and residual tensors beside them ([T, H] each, H < I),
# and the caching allocator's rounding and fragmentation between steps of different sizes.
# With piecewise graphs (runner/piecewise.py) those activations live in the graph pool instead,
# captured once at the largest bucket: measured on an H200 in bf16, 0.7 GiB for Llama-3-8B at 2048
# tokens and 2.7 GiB at 8192 (this reserve: 0.9 and 3.8 GB), 1.7 GiB for DeepSeek-V2-Lite at 8192.
_PREFILL_LIVE_TI = 8
# Per sampled row of the largest batch: the graphs' logits buffer [B, V] float32 and the sampler's
# [S, V] temporaries (scaled logits, probabilities, sorted probabilities + int64 order, cumulative
# mass, noise, and for seeded rows the int64 hash and its shifted copy), about 48 bytes per logit;
# with biases or penalties, the processed copy and the penalties' counts and seen mask, 9 more.
_SAMPLER_BYTES_PER_LOGIT = 57
# Per row of the largest decode graph: its activations in the graph pool, up to the MLP's [B, 2I]
# and [B, I] (with headroom as above), at 4 bytes each.
_GRAPH_LIVE_I = 8


# DeepSeek's MLA prefill decompresses the whole context of the step's prefill requests through
# kv_b_proj into per-head k [N, n, nope + rope] and k_nope|v [N, n, nope + v] (models/deepseek.py):
# N is the chunk plus the cached prefix of a chunked prompt, at most max_num_batched_tokens +
# max_model_len. The MoE's grouped GEMMs hold [T*k, I_moe] and [T*k, H] beside it, which the dense
# MLP's reserve above (first_k_dense_replace layers, I > I_moe * k / 3 at every released shape) covers.


def activation_reserve(cfg: EngineConfig, model_cfg: ModelConfig) -> int:
    """Bytes kept free beside the KV cache for a step's activations and the CUDA-graph pool."""
    inter, rows = model_cfg.intermediate_size, cfg.max_running_requests
    prefill = _PREFILL_LIVE_TI * cfg.max_num_batched_tokens * inter * _ACT_ITEMSIZE
    sampler = rows * model_cfg.vocab_size * _SAMPLER_BYTES_PER_LOGIT
    # prompt log-probabilities: their logits rows, the gathered copy and the top-k's temporaries
    sampler += PROMPT_LOGPROB_TOKENS_PER_STEP * model_cfg.vocab_size * 12
    graphs = _GRAPH_LIVE_I * rows * inter * _ACT_ITEMSIZE
    mla = 0
    if model_cfg.is_deepseek:
        m = model_cfg
        per_token = m.num_heads * (2 * m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        mla = (cfg.max_num_batched_tokens + cfg.max_model_len) * per_token * _ACT_ITEMSIZE
    return prefill + sampler + graphs + mla


def resolve_kv_dtype(name: str, dtype: torch.dtype, device: torch.device, kv_cls: type) -> torch.dtype:
    """The KV cache's dtype for --kv-cache-dtype: "auto" is the model's; "fp8" float8 e4m3 (the
    attention kernels widen each block they load to the query's dtype; the stores round to
    nearest and saturate at +-448, with no scale, as vLLM's uncalibrated "fp8"). Refused where it
    would not run as asked: on the CPU (its decode paths read a float cache) and for MLA's
    latent cache (DeepSeek: its kernels read the cache in the model's dtype)."""
    if name == "auto":
        return dtype
    if name != "fp8":
        raise ValueError(f"--kv-cache-dtype must be auto or fp8, got {name!r}")
    if device.type != "cuda":
        raise ValueError("--kv-cache-dtype fp8 needs CUDA: the CPU's decode paths read a float KV cache")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("--kv-cache-dtype fp8 needs a GPU with float8 conversions (compute capability 8.9+)")
    if kv_cls is not KVCache:
        raise ValueError("--kv-cache-dtype fp8 is for Llama-family models, not MLA's latent cache (DeepSeek)")
    return torch.float8_e4m3fn


def kv_cache_tokens(
    cfg: EngineConfig, model_cfg: ModelConfig, dtype, device: torch.device, tp: TPGroup = SINGLE
) -> int:
    """Token slots for the KV cache: set by the CLI, or what memory allows once the weights are in.

    On CUDA: the free memory above the (1 - gpu_memory_utilization) share of the card left to
    others, less the activation reserve. Never more than every running request at full length
    can use, never less than one request at full length (the scheduler needs that much). Under
    tensor parallelism this is one rank's answer (its own pools, its own card's memory); the ranks
    must agree on one number, the least of theirs."""
    if cfg.kv_cache_tokens > 0:
        return cfg.kv_cache_tokens
    per_token = model_family(model_cfg)[1].bytes_per_token(model_cfg, dtype, tp)
    if device.type == "cpu":
        budget = 2 << 30  # 2 GiB of host memory by default
    else:
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - (1.0 - cfg.gpu_memory_utilization) * total) - activation_reserve(cfg, model_cfg)
    tokens = min(budget // per_token, cfg.max_running_requests * cfg.max_model_len)
    return max(int(tokens), cfg.max_model_len)


class ModelRunner:
    """Owns the weights, the KV cache, the request-to-token table and the step inputs on one device.

    Built in steps, in this order because each depends on the one before: load the model; size
    the KV cache from the memory the weights left free; allocate the cache, then the persistent
    step buffers; capture the decode graphs, which read the cache and those buffers.

    `tp`: this process is one rank of a tensor-parallel group; it holds its shard of the model
    and of the KV cache, and every rank must run every step (`launch`) in lockstep."""

    def __init__(
        self,
        cfg: EngineConfig,
        progress: Callable[[int, int], None] | None = None,
        tp: TPGroup = SINGLE,
    ):
        self.cfg, self.tp = cfg, tp
        self.device = resolve_device(cfg.device)
        self.model_cfg = load_model_config(cfg.model_path)
        self.int4 = resolve_quantization(cfg, self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.model_cfg, packed=bool(self.int4))
        self.tp = tp = with_small_all_reduce(
            tp, self.dtype, self.device, cfg.nnodes, self.model_cfg.hidden_size
        )
        self.model_cls, self.kv_cls = model_family(self.model_cfg)
        torch.manual_seed(cfg.seed)  # the engine generator: unseeded requests sample from it
        self.model = self._load_model(progress)
        if self.device.type == "cuda":  # the KV sizing reads the driver's free memory: hand back
            torch.cuda.empty_cache()  # what loading freed (copies, DeepSeek's fused shared MLPs)
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype, self.device, self.kv_cls)
        self.num_kv_tokens = kv_cache_tokens(cfg, self.model_cfg, self.kv_dtype, self.device, tp)
        if not cfg.kv_cache_tokens:  # sized from each card's memory: every rank takes the least
            self.num_kv_tokens = tp.agree_min(self.num_kv_tokens, self.device)
        self._allocate_kv_cache()
        self._allocate_buffers()
        self.graphs = self._capture_graphs()
        self.piecewise = self._capture_piecewise()
        self.cpu_decode = self._cpu_decode()

    def _load_model(self, progress) -> LlamaForCausalLM | DeepseekForCausalLM:
        start = time.perf_counter()
        model = self.model_cls(self.model_cfg, self.dtype, self.device, tp=self.tp)
        if self.cfg.load_format == "random":
            load_weights(model, random_weights(self.model_cfg, self.cfg.seed, self.dtype, self.device))
            self._log_load(start, [], model)
            return model.eval()
        swapped = swap_int4_linears(model, [p.rpartition(".")[0] for p in self.int4 if "." in p])
        cache = self._weight_cache(swapped)
        state = cache.load() if cache is not None else None
        if state is not None:
            try:
                weight_cache.restore(model, state)
                self._log_load(start, swapped, model, f"packed weights read from {cache.path}")
                return model.eval()
            except (KeyError, ValueError, RuntimeError) as exc:  # an entry of another shape: rebuild
                log.warning("weight cache %s does not fit the model (%s): rebuilding it", cache.path, exc)
                model = self.model_cls(self.model_cfg, self.dtype, self.device, tp=self.tp)
                swapped = swap_int4_linears(model, [p.rpartition(".")[0] for p in self.int4 if "." in p])
        self._load_checkpoint(model, swapped, progress)
        if cache is not None:
            cache.store(weight_cache.packed_state(model))
        note = f"packed weights cached in {cache.path}" if cache is not None else ""
        self._log_load(start, swapped, model, note)
        return model.eval()

    def _weight_cache(self, swapped: list[str]) -> weight_cache.WeightCache | None:
        """The on-disk cache of this model's packed weights: for a GGUF whose 4-bit weights stay
        packed (the CPU), where --cache-dir / --no-cache leave one (runner/weight_cache.py)."""
        if not swapped or not self.cfg.weight_cache_dir or not is_gguf(self.cfg.model_path):
            return None
        key = weight_cache.cache_key(self.cfg.model_path, self.dtype, swapped)
        return weight_cache.WeightCache(self.cfg.weight_cache_dir, key)

    def _load_checkpoint(self, model, swapped: list[str], progress) -> None:
        """The weights from the checkpoint, then the int4 layers' and the int8 head's packing."""
        total = count_weights(self.cfg.model_path)

        def counted():
            weights = iter_weights(self.cfg.model_path, self.dtype, keep_int4=bool(swapped))
            for i, (name, tensor) in enumerate(weights, 1):
                yield name, tensor.to(self.device)
                if progress is not None:
                    progress(i, total)

        load_weights(model, counted())
        if swapped and self.dtype == torch.bfloat16:
            # the packed path's activations are bfloat16: the int8 kernel's fast path
            pack_int8_head(model)

    def _log_load(self, start: float, swapped: list[str], model, note: str = "") -> None:
        """The load line: what the weights are held in and what the step computes in."""
        dtype = str(self.dtype).removeprefix("torch.")
        if swapped:
            types = sorted({self.int4[f"{name}.weight"] for name in swapped})
            int8_head = isinstance(getattr(model, "lm_head", None), Int8Head)
            head = ", lm_head int8 (a scale per row)" if int8_head else ""
            scales = "bfloat16 scales"
            if model.get_submodule(swapped[0]).gemv:
                scales = f"float16 scales; below 64 rows {cpu_gemv.describe()}"
            quant = (
                f"int4: {len(swapped)} linear layers keep their {'/'.join(types)} weights packed "
                f"(groups of 32, {scales}){head}, the rest is {dtype}"
            )
        else:
            quant = "none (float weights)"
        self.load_seconds = time.perf_counter() - start
        log.info(
            "model %s loaded in %.2f s on %s: dtype %s, quantization %s%s",
            os.path.basename(os.path.normpath(self.cfg.model_path)),
            self.load_seconds,
            self.device,
            dtype,
            quant,
            f"; {note}" if note else "",
        )

    def _allocate_kv_cache(self) -> None:
        cfg = self.cfg
        # One extra cache slot and one extra table row: the sink that CUDA-graph padding writes to.
        self.kv = self.kv_cls.allocate(
            self.model_cfg, self.num_kv_tokens + 1, self.kv_dtype, self.device, tp=self.tp
        )
        self.req_to_token = torch.zeros(
            (cfg.max_running_requests + 1, cfg.max_model_len), dtype=torch.int32, device=self.device
        )
        log.info(
            "KV cache: %d token slots (%.2f GiB%s)",
            self.num_kv_tokens,
            self.num_kv_tokens * self.kv_cls.bytes_per_token(self.model_cfg, self.kv_dtype, self.tp) / 2**30,
            ", float8 e4m3" if self.kv_dtype != self.dtype else "",
        )

    def _allocate_buffers(self) -> None:
        """The persistent step inputs (read by the eager path and every graph) and outputs."""
        cfg = self.cfg
        self.inputs = InputBuffers(
            # A step never exceeds the token budget, and a decode step holds one token per request.
            max_tokens=max(cfg.max_num_batched_tokens, cfg.max_running_requests),
            max_batch=cfg.max_running_requests,
            req_to_token=self.req_to_token,
            sink_slot=self.num_kv_tokens,
            sink_row=cfg.max_running_requests,
            max_prefix_slots=max_prefix_slots(cfg.max_model_len, cfg.max_num_batched_tokens),
            vocab_size=self.model_cfg.vocab_size,
            # decode-only steps' requests by length: the CUDA decode attention kernels balance by it
            order_decode_rows=self.device.type == "cuda",
        )
        self._last_sampled = torch.empty(0, dtype=torch.int64, device=self.device)
        self._last_index: dict[int, int] = {}
        if self.device.type == "cuda":  # two, because step N+1 is launched before N is collected
            rows = self.inputs.staging.capacity("lp_rows")
            self._pinned = [
                (
                    torch.empty(cfg.max_running_requests, dtype=torch.int64, pin_memory=True),
                    torch.empty(rows, dtype=torch.float32, pin_memory=True),
                    torch.empty(rows * MAX_TOP_LOGPROBS, dtype=torch.int32, pin_memory=True),
                    torch.empty(rows * MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=True),
                )
                for _ in range(2)
            ]
            self._flip = 0
        timing = self.device.type == "cuda" and os.environ.get("LLA_STEP_TIMING") == "1"
        self.step_times = StepTimes() if timing else None

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.cfg.disable_cuda_graph:
            return None
        graphs = DecodeGraphs(self.model, self.kv, self.inputs, self.cfg.max_running_requests)
        graphs.capture()
        return graphs

    def _capture_piecewise(self) -> PiecewiseGraphs | None:
        """Graphs for steps with prefill chunks, in the decode graphs' pool (runner/piecewise.py)."""
        if self.graphs is None or self.cfg.disable_piecewise_graph:
            return None
        max_tokens = self.inputs.staging.capacity("positions")
        graphs = PiecewiseGraphs(self.model, self.kv, self.inputs, max_tokens, self.graphs.pool)
        graphs.capture()
        torch.cuda.empty_cache()  # the warm-up steps' eager blocks
        return graphs

    def _cpu_decode(self) -> CpuDecode | NativeDecode | None:
        """The CPU's decode steps (Llama family, one rank): one C call a step for an int4-packed
        model (`--cpu-step`), else torch's batched attention, compiled on request."""
        if self.device.type != "cpu" or self.model_cls is not LlamaForCausalLM or self.tp.size > 1:
            return None
        step = self.cfg.cpu_step
        if step == "c" or (step == "auto" and not self.cfg.cpu_compile):
            why = cpu_native.unsupported(self.model, self.kv)
            if why is None:
                threads = cpu_native.step_threads(self.cfg)
                native = NativeDecode(self.model, self.kv, self.req_to_token.shape[1], threads)
                log.info("CPU decode steps: one C call a step (csrc/decode_step.c), %d thread(s)", threads)
                return native
            if step == "c":
                raise ValueError(f"--cpu-step c: {why}")
        cpu = CpuDecode(self.model, self.kv, self.cfg.cpu_compile)
        cpu.warm_up(self.inputs, self.cfg.max_running_requests)
        return cpu

    def execute(self, batch: Batch) -> Sampled:
        """Run one step and wait for its tokens."""
        return self.collect(self.launch(batch))

    def launch(self, batch: Batch) -> StepHandle:
        """Enqueue a step on the device and return without waiting for it.

        Inputs marked PENDING_TOKEN are the previous launch's samples, taken on the device, so the
        engine can schedule step N+1 while step N still runs. A CUDA error is a DeviceFailure; any
        other exception concerns this step's requests (the engine isolates them)."""
        with device_failures():
            return self._launch(batch)

    def _launch(self, batch: Batch) -> StepHandle:
        began = None
        if self.step_times is not None:
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        bucket = self.graphs.bucket_for(batch) if self.graphs is not None else None
        pieces = None
        if bucket is None and self.piecewise is not None and not batch.decode_only:
            pieces = self.piecewise.bucket_for(batch.num_tokens)
        step = self.inputs.load(
            batch, self._last_sampled, self._last_index, pad_to=bucket or 0, pad_tokens_to=pieces or 0
        )
        if bucket is not None:
            logits = self.graphs.replay(bucket)[: step.num_samples]  # [B, V]: padding rows dropped
        elif pieces is not None:
            x = self.piecewise.replay(pieces, step.ctx).index_select(0, step.ctx.logits_idx)
            logits = self.model.head_logits(x)  # [S + E, V]
        elif self.cpu_decode is not None and batch.decode_only:
            logits = self.cpu_decode.forward(step.input_ids, step.ctx)  # [S + E, V]
        else:
            logits = self.model(step.input_ids, step.ctx, self.kv)  # [S + E, V]: E prompt logprob rows
        tokens = sample(logits[: step.num_samples], step.sampling)  # [S]
        # Under tensor parallelism every rank samples from the same logits with the same generator;
        # rank 0's tokens are broadcast anyway, so that no rank can ever feed the next step others.
        self.tp.broadcast(tokens)
        # log-probabilities are reported by rank 0 only
        logprobs = (
            compute_logprobs(logits, tokens, step.logprobs) if step.logprobs and self.tp.rank == 0 else None
        )
        self._last_sampled = tokens
        slots = sampling_slots(batch)
        self._last_index = dict(zip(slots, range(len(slots)), strict=True))
        if self.device.type != "cuda":
            return StepHandle(tokens, None, logprobs)
        self._flip ^= 1
        pinned = self._pinned[self._flip]
        host = pinned[0][: step.num_samples]
        host.copy_(tokens, non_blocking=True)
        if logprobs is not None:
            rows, k = logprobs[1].shape  # contiguous [rows, k] views of the flat pinned buffers
            n = rows * k
            host_lp = pinned[1][:rows], pinned[2][:n].view(rows, k), pinned[3][:n].view(rows, k)
            for dst, src in zip(host_lp, logprobs, strict=True):
                dst.copy_(src, non_blocking=True)
            logprobs = host_lp
        done = torch.cuda.Event(enable_timing=began is not None)
        done.record()
        return StepHandle(host, done, logprobs, began)

    def collect(self, handle: StepHandle) -> Sampled:
        """The step's sampled tokens and log-probabilities: the one host sync of a step."""
        with device_failures():
            if handle.done is not None:
                handle.done.synchronize()
                if handle.began is not None:
                    self.step_times.collected(handle)
            logprobs = None
            if handle.logprobs is not None:  # copies: the pinned buffers serve a later step
                chosen, ids, top = (t.numpy().copy() for t in handle.logprobs)
                logprobs = StepLogprobs(chosen, ids, top)
            return Sampled(token_ids=tuple(handle.tokens.tolist()), logprobs=logprobs)


@contextlib.contextmanager
def device_failures() -> Iterator[None]:
    """Re-raise what means the device is broken as DeviceFailure: a CUDA error poisons the whole
    context (every later call fails too), so no request is to blame and the engine must end."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise  # one step asked too much: recoverable, and the engine isolates the request
    except Exception as exc:
        accel = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
        if isinstance(exc, accel) or "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
            raise DeviceFailure(str(exc)) from exc
        raise
