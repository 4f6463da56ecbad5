"""Drive scheduler + runner in-process, the way the engine loop does, without shared memory."""

from __future__ import annotations

import torch

from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.types import SamplingParams


def generate(
    runner,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    max_num_batched_tokens: int = 2048,
) -> list[list[int]]:
    """Greedy (or `params`) outputs for all prompts, batched together by the real scheduler."""
    cfg = runner.cfg
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=cfg.max_running_requests,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=cfg.max_model_len,
            kv_cache_tokens=runner.num_kv_tokens,
        )
    )
    params = params or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        sched.add(Request(slot=i, gen=0, prompt_ids=list(p), params=params, arrival=i))
    outputs: dict[int, list[int]] = {}
    while (batch := sched.schedule()) is not None:
        for f in sched.update(batch, runner.execute(batch))[1]:
            outputs[f.request.slot] = f.request.output_ids
    return [outputs[i] for i in range(len(prompts))]


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
