"""The CPU engine's memory under prompts of every length: bounded, and what it was before.

    python perf/cpu_memory_bench.py [--rounds 240] [--threads 2]

The real engine in-process (tests/engine_harness.py) serves the default model as the server does
(4-bit weights kept packed, bfloat16 activations, 8192 KV tokens, 16 running), in rounds of 1-16
greedy requests whose prompts are 5-300 tokens long (1-16 new tokens each). It prints the process's
anonymous RSS every 30 rounds, twice, each in its own process: as the code runs (the 16-bit CPU
kernels at `kernels/cpu_shapes.bucket` sizes), and with that rounding turned off (every row count
as it comes), which is how it ran before 2026-12-01. torch's oneDNN kernels keep state per shape
that they never give back (perf/RESULTS.md), so without the rounding the RSS grows with every new
prompt length and does not stop.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "src"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(rounds: int, unbounded: bool) -> None:
    from engine_harness import EngineHarness
    from lightllm_async.config import EngineConfig
    from lightllm_async.kernels import cpu_shapes
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.runner.model_runner import ModelRunner
    from lightllm_async.types import SamplingParams

    if unbounded:
        cpu_shapes.bucket = lambda n, fine=False: n  # every row count as it comes
    cfg = EngineConfig(
        model_path=default_model_path(), device="cpu", max_model_len=512, kv_cache_tokens=8192,
        max_running_requests=16, max_num_batched_tokens=2048,
    )  # fmt: skip
    h = EngineHarness(
        ModelRunner(cfg), max_model_len=512, max_running_requests=16, max_num_batched_tokens=2048,
        num_slots=16, kv_cache_tokens=8192,
    )  # fmt: skip
    rng, t0, line = random.Random(0), time.time(), []
    for r in range(rounds + 1):
        if r % 30 == 0:
            line.append(f"{rss_mb():7.0f}")
        refs = []
        for _ in range(rng.randint(1, 16)):
            prompt = [rng.randint(3, 49000) for _ in range(rng.randint(5, rng.choice([40, 300])))]
            refs.append(h.submit(prompt, SamplingParams(max_new_tokens=rng.randint(1, 16), temperature=0.0)))
        h.step_until_done(refs)
        for slot, gen in refs:
            h.frontend.free_slot(slot, gen)
    h.close()
    mode = "unbounded (before)" if unbounded else "bucketed (now)"
    print(f"{mode:<20} {' '.join(line)}   {time.time() - t0:6.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=240)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["bucketed", "unbounded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        run(args.rounds, args.child == "unbounded")
        return
    cols = " ".join(f"{r:>7}" for r in range(0, args.rounds + 1, 30))
    print(f"engine RssAnon MB after rounds {cols}   seconds")
    for child in ("bucketed", "unbounded"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            child,
            "--rounds",
            str(args.rounds),
            "--threads",
            str(args.threads),
        ]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
