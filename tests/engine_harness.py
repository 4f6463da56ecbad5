"""Drive scheduler + runner in-process, the way the engine loop does, without shared memory."""

from __future__ import annotations

from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.ipc import RequestParams


def generate(runner, prompts: list[list[int]], max_new_tokens: int, params: RequestParams | None = None,
             max_num_batched_tokens: int = 2048) -> list[list[int]]:
    """Greedy (or `params`) outputs for all prompts, batched together by the real scheduler."""
    cfg = runner.cfg
    sched = Scheduler(SchedulerConfig(
        max_running_requests=cfg.max_running_requests, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=cfg.max_model_len, kv_cache_tokens=runner.num_kv_tokens))
    params = params or RequestParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        sched.add(Request(slot=i, gen=0, prompt_ids=list(p), params=params, arrival=i))
    outputs: dict[int, list[int]] = {}
    while (batch := sched.schedule()) is not None:
        for f in sched.update(batch, runner.execute(batch)):
            outputs[f.request.slot] = f.request.output_ids
    return [outputs[i] for i in range(len(prompts))]
