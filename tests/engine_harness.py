"""The real Engine in-process: a region (frontend view + engine view), a scheduler, and a runner —
the model runner for parity tests, or a scripted one for the engine's own tests."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightllm_async.batch import Batch, Sampled, ScheduledReq
from lightllm_async.config import EngineConfig
from lightllm_async.engine.engine import Engine
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.ipc import OutputView, Region, RegionSpec
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.dummy import certain_logprobs
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.types import FinishReason, SamplingParams

_ids = itertools.count()


def model_runner(
    path: str,
    device: str = "cpu",
    max_model_len: int = 256,
    kv_cache_tokens: int = 4096,
    max_running_requests: int = 8,
):
    """The real ModelRunner on a small model, float32 with every weight dequantized (what HF parity
    runs in; "auto" is bfloat16 on CUDA, and 4-bit GGUF weights stay packed on the CPU)."""
    from lightllm_async.runner.model_runner import ModelRunner

    return ModelRunner(
        EngineConfig(
            model_path=path, device=device, dtype="float32", quantization="none",
            max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens,
            max_running_requests=max_running_requests,
        )
    )  # fmt: skip


class ScriptedRunner:
    """A runner without a model: a request's k-th output token is `token(first prompt token, k)`.
    It keeps the token each KV slot was written for, so that a request whose prompt starts in
    the prefix cache reads its first token where the cache says it is.

    `fail(item)` True makes a launch that contains `item` raise ValueError, as a sampling or
    forward error that concerns that request would. `gate`, while cleared, holds launches back.
    """

    def __init__(
        self,
        num_kv_tokens: int = 4096,
        fail: Callable[[ScheduledReq], bool] | None = None,
        script: Sequence[int] | None = None,
        step_time: float = 0.0,
    ):
        self.num_kv_tokens = num_kv_tokens
        self.fail = fail
        self.script = script  # if given, the k-th output token of every request is script[k % len]
        self.step_time = step_time
        self.gate = threading.Event()
        self.gate.set()
        self.launched: list[Batch] = []
        self._base: dict[tuple[int, int], int] = {}
        self._kv: dict[int, int] = {}  # KV slot -> the token whose "KV" it holds

    @staticmethod
    def token(base: int, k: int) -> int:
        return 3 + (base * 31 + 7 * k) % 97

    def launch(self, batch: Batch) -> Sampled:
        self.gate.wait()
        if self.step_time:
            time.sleep(self.step_time)
        self.launched.append(batch)
        out = []
        for it in batch.items:
            for tok, kv_slot in zip(it.token_ids, it.new_kv_slots, strict=True):
                self._kv[kv_slot] = tok
            if it.start == 0:
                self._base[it.slot, it.gen] = it.token_ids[0]
            elif it.prefix_kv_slots:
                self._base[it.slot, it.gen] = self._kv[it.prefix_kv_slots[0]]
            if self.fail is not None and self.fail(it):
                raise ValueError(f"scripted failure of slot {it.slot}")
            if it.samples and self.script:
                out.append(self.script[it.num_output % len(self.script)])
            elif it.samples:
                out.append(self.token(self._base[it.slot, it.gen], it.num_output))
        return Sampled(tuple(out), certain_logprobs(batch, out, 1 << 16))

    @staticmethod
    def collect(handle: Sampled) -> Sampled:
        return handle


class RecordingScheduler(Scheduler):
    """The real scheduler, noting each request as it arrives and how each one ended."""

    def __init__(self, cfg: SchedulerConfig):
        super().__init__(cfg)
        self.submitted: list[tuple[list[int], SamplingParams]] = []  # (prompt ids, params) as read
        self.finished: list[tuple[FinishReason, int]] = []  # (reason, output tokens)

    def add(self, req) -> None:
        self.submitted.append((list(req.prompt_ids), req.params))
        super().add(req)

    def abort(self, slot: int):
        req = super().abort(slot)
        if req is not None:
            self.finished.append((FinishReason.ABORT, len(req.output_ids)))
        return req

    def update(self, batch, sampled):
        applied, finished = super().update(batch, sampled)
        self.finished += [(f.reason, len(f.request.output_ids)) for f in finished]
        return applied, finished


class LiveEngine:
    """The real Engine looping in a thread on an existing region, with a scripted runner: what the
    frontend's tests talk to. `paused` holds every step back; `kill()` stops it like a crash."""

    def __init__(
        self,
        region_name: str,
        script: Sequence[int],
        max_model_len: int,
        step_time: float = 5e-4,
        prefix_cache: bool = True,
    ):
        kv_tokens = max(max_model_len, min(64 * max_model_len, 1 << 16))
        self.runner = ScriptedRunner(num_kv_tokens=kv_tokens, script=script, step_time=step_time)
        self.region = Region.attach(region_name)
        self.scheduler = RecordingScheduler(
            SchedulerConfig(
                max_running_requests=64,
                max_num_batched_tokens=8 * max_model_len,
                max_model_len=max_model_len,
                kv_cache_tokens=self.runner.num_kv_tokens,
                enable_prefix_cache=prefix_cache,
            )
        )
        self.engine = Engine(self.region, self.scheduler, self.runner)
        self.alive = True  # what engine_alive() reports
        self.submitted, self.finished = self.scheduler.submitted, self.scheduler.finished
        self._thread = threading.Thread(target=self.engine.run, daemon=True)
        self._thread.start()

    @property
    def step_time(self) -> float:
        return self.runner.step_time

    @step_time.setter
    def step_time(self, seconds: float) -> None:
        self.runner.step_time = seconds

    def pause(self) -> None:
        self.runner.gate.clear()

    def resume(self) -> None:
        self.runner.gate.set()

    def kill(self) -> None:
        self.alive = False
        self.engine.stop.set()
        self.runner.gate.set()
        self._thread.join(2)
        self.region.close()


class EngineHarness:
    """A region, the real Engine on its engine view, and the frontend view to submit with."""

    def __init__(
        self,
        runner: Any,
        max_model_len: int = 256,
        max_running_requests: int = 8,
        max_num_batched_tokens: int = 64,
        num_slots: int = 32,
        prefix_cache: bool = True,
        kv_cache_tokens: int | None = None,  # fewer than the runner's slots: a smaller pool
        expected_output_tokens: int = 256,
        logprob_ring: int = 256,
    ):
        spec = RegionSpec(num_slots=num_slots, max_tokens_per_slot=max_model_len, logprob_ring=logprob_ring)
        self.frontend = Region.create(f"harness-{os.getpid()}-{next(_ids)}", spec)
        self.engine_view = Region.attach(self.frontend.name)
        sched = Scheduler(
            SchedulerConfig(
                max_running_requests=max_running_requests,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                kv_cache_tokens=min(kv_cache_tokens or runner.num_kv_tokens, runner.num_kv_tokens),
                expected_output_tokens=expected_output_tokens,
                enable_prefix_cache=prefix_cache,
            )
        )
        self.engine = Engine(self.engine_view, sched, runner)
        self.max_model_len = max_model_len
        self._thread: threading.Thread | None = None

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, int]:
        ref = self.frontend.start_request(prompt, params.with_context(len(prompt), self.max_model_len))
        assert ref is not None, "no free slot"
        return ref

    def done(self, ref: tuple[int, int]) -> bool:
        return self.frontend.read_output(ref[0]).finished

    def step_until_done(self, refs: Sequence[tuple[int, int]], max_steps: int = 100_000) -> list[OutputView]:
        """Drive `engine.step()` from this thread until every request finished; outputs in order."""
        for _ in range(max_steps):
            if all(self.done(r) for r in refs):
                break
            self.engine.step()
        else:
            raise AssertionError("requests did not finish")
        return [self.frontend.read_output(slot) for slot, _ in refs]

    def start(self) -> None:
        """Run the engine loop in a thread until `stop()`."""
        self._thread = threading.Thread(target=self.engine.run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.engine.stop.set()
        if self._thread is not None:
            self._thread.join(5)
            assert not self._thread.is_alive(), "engine loop did not stop"

    def close(self) -> None:
        self.stop()
        self.engine_view.close()
        self.frontend.unlink()
        self.frontend.close()


def generate(
    runner,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    max_num_batched_tokens: int = 2048,
) -> list[list[int]]:
    """Greedy (or `params`) outputs for all prompts, batched together by the real engine."""
    cfg = runner.cfg
    h = EngineHarness(
        runner,
        max_model_len=cfg.max_model_len,
        max_running_requests=cfg.max_running_requests,
        max_num_batched_tokens=max_num_batched_tokens,
        num_slots=max(len(prompts), 1),
    )
    try:
        params = params or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        refs = [h.submit(p, params) for p in prompts]
        return [out.tokens for out in h.step_until_done(refs)]
    finally:
        h.close()


def overlapped_generate(runner, prompts, params, seen: list[Batch] | None = None) -> list[list[int]]:
    """The runner alone with a scheduler, in the engine loop's order (launch step N+1, then
    collect step N); `seen` receives every step's batch."""
    from lightllm_async.engine.request import Request

    cfg = runner.cfg
    sched = Scheduler(
        SchedulerConfig(
            cfg.max_running_requests, cfg.max_num_batched_tokens, cfg.max_model_len, runner.num_kv_tokens
        )
    )
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        sched.add(Request(slot=i, gen=0, prompt_ids=list(prompt), params=p, arrival=i))
    outputs: dict[int, list[int]] = {}
    inflight = None
    while True:
        batch = sched.schedule()
        if batch is not None and seen is not None:
            seen.append(batch)
        launched = None if batch is None else (batch, runner.launch(batch))
        if inflight is not None:
            for f in sched.update(inflight[0], runner.collect(inflight[1]))[1]:
                outputs[f.request.slot] = f.request.output_ids
        inflight = launched
        if inflight is None and not sched.has_work():
            return [outputs[i] for i in range(len(prompts))]


def generate_with_logprobs(runner, max_model_len: int, requests, chunk: int = 64) -> list:
    """Requests run together by the real engine: per request (output, first logprob position,
    chosen [m], top ids [m, k], top logprobs [m, k]) as the region's ring holds them, or None
    for a request without log-probabilities. The ring must hold a whole request (no reader)."""
    h = EngineHarness(
        runner, max_model_len=max_model_len, max_running_requests=8, max_num_batched_tokens=chunk
    )
    try:
        refs = [h.submit(p, params) for p, params in requests]
        outs = h.step_until_done(refs)
        got = []
        for (slot, _), (prompt, params), out in zip(refs, requests, outs, strict=True):
            if not params.wants_logprobs:
                got.append(None)
                continue
            first = params.first_logprob_position(len(prompt))
            end = h.frontend.logprob_end(slot)
            assert end == len(prompt) + len(out.tokens)  # every position up to the last token
            got.append((out, first, *h.frontend.read_logprobs(slot, first, end, params.top_logprobs)))
        return got
    finally:
        h.close()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation, eos ignored: exactly n tokens."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def smollm2_prompts() -> list[list[int]]:
    tok = load_tokenizer(default_model_path())
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in chats]
    prompts += [tok.encode("The quick brown fox"), tok.encode("def fibonacci(n):\n    ")]
    return prompts
