"""Where a CPU decode step of the embedded SmolLM2 goes: the in-process runner (no server), one
request decoding after a short prompt; mean ms per step over --steps, then torch.profiler's table
of ops (self CPU time) over a few of those steps.

    PYTHONPATH=src python perf/cpu_step_profile.py [--quantization auto] [--dtype auto]
        [--batch 1] [--steps 64] [--threads 1] [--rows 25] [--cpu-step auto|c|torch] [--cpu-compile]
        [--no-profile]

`--cpu-step c` (the default `auto` where the model is int4-packed) runs the C decode step
(csrc/decode_step.c) with --threads threads; `torch` the eager torch step (`--cpu-compile`: compiled).
CPU time is reported for the calling thread and for the whole process (the C step's workers).

`--alternate torch,c1,c2 [--rounds 3]`: one runner, its decode step swapped between the eager
torch step (`torch`) and C steps of N threads (`cN`, `cN:S` spinning S us before sleeping),
round after round, so that a changing load on a shared machine falls on each alike. As the engine
process does, idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE unless set).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as engine/process.py, before torch loads

import torch
from torch.profiler import ProfilerActivity, profile

from lightllm_async.config import EngineConfig
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.cpu_native import SPIN_US, NativeDecode
from lightllm_async.runner.cpu_step import CpuDecode
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.types import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decoding(runner: ModelRunner, prompt: list[int], batch: int, n: int) -> Scheduler:
    """A scheduler whose `batch` requests have been prefilled and are decoding (n tokens each)."""
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=batch,
            max_num_batched_tokens=2048,
            max_model_len=runner.cfg.max_model_len,
            kv_cache_tokens=runner.num_kv_tokens,
        )
    )
    for slot in range(batch):
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        sched.add(Request(slot=slot, gen=0, prompt_ids=prompt, arrival=0, params=params))
    b = sched.schedule()  # the prefill
    sched.update(b, runner.execute(b))
    return sched


def step(runner: ModelRunner, sched: Scheduler) -> None:
    b = sched.schedule()
    sched.update(b, runner.execute(b))


def timed(runner: ModelRunner, sched: Scheduler, steps: int) -> tuple[float, float, float]:
    """(wall, calling thread's CPU, process CPU) ms a step over `steps` steps."""
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(steps):
        step(runner, sched)
    return tuple(
        1000 * (time.perf_counter() - t0, time.thread_time() - c0, time.process_time() - p0)[i] / steps
        for i in range(3)
    )


def alternate(runner: ModelRunner, sched: Scheduler, args) -> None:
    steps = {}
    for name in args.alternate.split(","):
        if name == "torch":
            steps[name] = CpuDecode(runner.model, runner.kv, False)
        else:
            threads, _, spin = name.removeprefix("c").partition(":")
            stride = runner.req_to_token.shape[1]
            steps[name] = NativeDecode(runner.model, runner.kv, stride, int(threads), int(spin or SPIN_US))
    for r in range(args.rounds):
        for name, decode in steps.items():
            runner.cpu_decode = decode
            for _ in range(8):
                step(runner, sched)
            ms, cpu, proc = timed(runner, sched, args.steps)
            rate = 1000 * args.batch / ms
            print(
                f"round {r} {name:>8}: {ms:6.2f} ms a step at batch {args.batch} ({rate:6.1f} tok/s); CPU "
                f"{cpu:6.2f} ms this thread, {proc:6.2f} ms the process; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--cpu-compile", action="store_true")
    ap.add_argument("--cpu-step", default="auto", choices=("auto", "c", "torch"))
    ap.add_argument("--no-profile", action="store_true", help="skip torch.profiler's table")
    ap.add_argument("--alternate", default="", help="steps to alternate: torch,c1,c2,c2:200 (see above)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path()
    extra = {"cpu_compile": True} if args.cpu_compile else {}
    extra["cpu_step"] = args.cpu_step
    cfg = EngineConfig(
        model_path=path, device="cpu", quantization=args.quantization, dtype=args.dtype,
        max_model_len=1024, kv_cache_tokens=8192, max_running_requests=max(args.batch, 1), **extra,
    )  # fmt: skip
    t0 = time.perf_counter()
    runner = ModelRunner(cfg)
    print(f"runner built in {time.perf_counter() - t0:.2f} s")
    prompt = load_tokenizer(path).encode(PROMPT)
    kinds = len(args.alternate.split(",")) if args.alternate else 1
    sched = decoding(runner, prompt, args.batch, (args.steps + 8) * (1 + args.rounds * kinds) + 40)
    if args.alternate:
        alternate(runner, sched, args)
        return
    for _ in range(8):  # warm-up (and compile, if any)
        step(runner, sched)
    ms, cpu_ms, proc_ms = timed(runner, sched, args.steps)  # CPU: this thread's, and every thread's
    kind = type(runner.cpu_decode).__name__ + (" compiled" if runner.cpu_decode.compiled else "")
    print(
        f"decode step ({kind}): {ms:.2f} ms at batch {args.batch} ({1000 * args.batch / ms:.1f} tok/s), "
        f"{torch.get_num_threads()} threads; CPU time {cpu_ms:.2f} ms this thread, "
        f"{proc_ms:.2f} ms the process"
    )
    if args.no_profile:
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(16):
            step(runner, sched)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
