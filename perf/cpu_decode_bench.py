"""Single-stream decode speed of SmolLM2 on the CPU: our engine against HF transformers `generate`.

Both run greedy, fp32, the same prompt and the same number of new tokens, in the same process
and run, alternating, best of --repeats. Our side is measured twice: in-process (scheduler +
runner, no IPC) and through the HTTP server (streaming, the whole process tree).

    python perf/cpu_decode_bench.py [--tokens 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

import torch

from lightllm_async.config import EngineConfig
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.types import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ours_in_process(runner: ModelRunner, prompt: list[int], n: int) -> float:
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=1,
            max_num_batched_tokens=2048,
            max_model_len=runner.cfg.max_model_len,
            kv_cache_tokens=runner.num_kv_tokens,
        )
    )
    sched.add(
        Request(
            slot=0,
            gen=0,
            prompt_ids=prompt,
            arrival=0,
            params=SamplingParams(max_new_tokens=n, temperature=0.0),
        )
    )
    start = time.perf_counter()
    while (batch := sched.schedule()) is not None:
        sched.update(batch, runner.execute(batch))
    return time.perf_counter() - start


def hf_generate(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == len(prompt) + n
    return elapsed


def ours_over_http(n: int, repeats: int) -> float:
    port = 8399
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightllm_async.server",
            "--device",
            "cpu",
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--kv-cache-tokens",
            "4096",
            "--quantization",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "lightllm-async ready" in line:
                break
        body = json.dumps(
            {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        ).encode()
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            start = time.perf_counter()
            with urllib.request.urlopen(req) as r:
                r.read()
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    prompt = load_tokenizer(path).encode(PROMPT)
    runner = ModelRunner(
        EngineConfig(
            model_path=path,
            device="cpu",
            quantization="none",  # the float32 reference HF is compared with
            max_model_len=1024,
            kv_cache_tokens=4096,
            max_running_requests=1,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    n = args.tokens
    ours_in_process(runner, prompt, 4), hf_generate(hf, prompt, 4)  # warm-up
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_ours = min(t_ours, ours_in_process(runner, prompt, n))
        t_hf = min(t_hf, hf_generate(hf, prompt, n))
    del runner, hf
    t_http = ours_over_http(n, args.repeats)
    print(
        f"\nSmolLM2-135M fp32, CPU ({torch.get_num_threads()} threads), prompt {len(prompt)} tokens, "
        f"{n} new tokens, best of {args.repeats}"
    )
    print(f"{'engine':<34}{'seconds':>10}{'tokens/s':>12}{'vs HF':>8}")
    for name, t in [
        ("HF transformers generate", t_hf),
        ("lightllm-async in-process", t_ours),
        ("lightllm-async HTTP stream", t_http),
    ]:
        print(f"{name:<34}{t:>10.3f}{n / t:>12.1f}{t_hf / t:>7.2f}x")


if __name__ == "__main__":
    main()
