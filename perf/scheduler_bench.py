"""CPU cost of the scheduler per engine step (issue 10: schedule() + update() with 1,000 running
requests under 1 ms). Like the scheduler: no torch, no device; numpy for its steady decode set.

N requests are admitted and prefilled, then every step decodes all of them: `schedule()` builds
the batch, a fake device samples one token per request, `update()` applies them. Also timed: the
overlapped order the engine uses (the next step scheduled while one is in flight, its tokens
pending). Prints the median CPU time per step of each part; the fake device is not timed.

    python perf/scheduler_bench.py [--running 1000] [--steps 200] [--prompt 128] [--no-decode-set]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lightllm_async.batch import Sampled  # noqa: E402
from lightllm_async.engine.request import Request  # noqa: E402
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from lightllm_async.types import SamplingParams  # noqa: E402


def fill(running: int, prompt: int, prefix_cache: bool, decode_set: bool = True) -> Scheduler:
    max_len = prompt + 4096
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=running,
            max_num_batched_tokens=8192,
            max_model_len=max_len,
            kv_cache_tokens=running * max_len,
            enable_prefix_cache=prefix_cache,
            decode_set=decode_set,
        )
    )
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=4000, temperature=0.0)
    for i in range(running):
        ids = [rng.randrange(3, 30000) for _ in range(prompt)]
        sched.add(Request(slot=i, gen=0, prompt_ids=ids, params=params, arrival=i))
    while True:  # prefill everything
        batch = sched.schedule()
        sched.update(batch, sample(batch))
        if batch.decode_only and len(batch.items) == running:
            return sched


def sample(batch) -> Sampled:
    """The fake device: a token per sampling item, in batch order (a decode run's rows first, read
    as columns, as a runner reads them)."""
    run, rest = batch.parts()
    head = [100 + slot % 7 for slot in run.slot.tolist()] if run is not None else []
    return Sampled((*head, *(100 + item.slot % 7 for item in rest if item.samples)))


def timed(steps: int, sched: Scheduler, overlap: bool) -> tuple[list[float], list[float]]:
    """Only the scheduler's own calls are timed, not the fake device's sampling."""
    t_sched, t_update, inflight = [], [], None
    for _ in range(steps):
        t0 = time.process_time()
        batch = sched.schedule()
        t_sched.append(time.process_time() - t0)
        done = inflight if overlap else batch
        if done is not None:
            sampled = sample(done)
            t0 = time.process_time()
            sched.update(done, sampled)
            t_update.append(time.process_time() - t0)
        inflight = batch
    return t_sched, t_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--running", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument(
        "--no-decode-set", action="store_true", help="one request at a time (the path before the decode set)"
    )
    args = ap.parse_args()
    print(f"{args.running} running requests, prompts of {args.prompt} tokens, {args.steps} decode steps")
    print(f"{'prefix cache':<14}{'order':<12}{'schedule ms':>13}{'update ms':>11}{'total ms':>10}")
    for cache in (True, False):
        for overlap in (False, True):
            sched = fill(args.running, args.prompt, cache, not args.no_decode_set)
            s, u = timed(args.steps, sched, overlap)
            ms, mu = statistics.median(s) * 1e3, statistics.median(u) * 1e3
            order = "overlapped" if overlap else "in turn"
            print(f"{'on' if cache else 'off':<14}{order:<12}{ms:>13.3f}{mu:>11.3f}{ms + mu:>10.3f}")


if __name__ == "__main__":
    main()
