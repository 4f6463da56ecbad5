"""Token publishing: a reader in another process never sees a count ahead of the tokens it covers."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import uuid

import numpy as np

from lightllm_async.ipc import Region, RegionSpec, SlotState
from lightllm_async.types import FinishReason, SamplingParams

TOTAL = 60000
PROMPT = [3, 1, 4]


def _token(i: int) -> int:
    return (i * 2654435761) % 2**31 | 1  # never the 0 or -1 of an unwritten cell


def _logprob(i: int) -> float:
    return -float(i % 1000) / 8  # exact in float32


def _writer(name: str, slot: int, seed: int) -> None:
    engine, rng = Region.attach(name), random.Random(seed)
    engine.set_running(slot)
    n = 0
    while n < TOTAL:
        k = min(rng.randint(1, 8), TOTAL - n)
        span = range(n, n + k)
        engine.append_tokens(slot, [_token(i) for i in span], [_logprob(i) for i in span])
        n += k
    engine.finish(slot, FinishReason.LENGTH)
    os._exit(0)


def test_reader_sees_counts_only_with_their_tokens():
    spec = RegionSpec(num_slots=2, max_tokens_per_slot=TOTAL + len(PROMPT))
    front = Region.create(f"t{os.getpid()}-{uuid.uuid4().hex[:8]}", spec)
    try:
        slot, gen = front.alloc_slot()
        front.write_request(slot, PROMPT, SamplingParams(max_new_tokens=TOTAL, logprobs=True))
        front._tokens[slot, len(PROMPT) :] = -1  # poison the output cells
        front.submit(slot, gen)
        writer = mp.get_context("fork").Process(target=_writer, args=(front.name, slot, 7))
        writer.start()
        seen, reads, out = 0, 0, front.read_output(slot)
        while not out.finished:
            out = front.read_output(slot, seen)
            assert out.num_tokens >= seen
            assert out.tokens == [_token(i) for i in range(seen, out.num_tokens)]
            assert out.num_tokens == 0 or out.logprobs == [_logprob(i) for i in range(seen, out.num_tokens)]
            seen, reads = out.num_tokens, reads + 1
        writer.join(10)
        assert writer.exitcode == 0
        assert (seen, out.finish_reason) == (TOTAL, FinishReason.LENGTH)
        assert out.finish_time >= out.first_token_time > 0
        assert reads > 10  # the reader really ran alongside the writer
    finally:
        front.close()
        front.unlink()


STEP_SLOTS, STEPS = 7, 4000


def _step_writer(name: str, slots: list[int], seed: int) -> None:
    """Decode steps over a random subset of the slots each time, as the engine publishes them."""
    engine, rng = Region.attach(name), random.Random(seed)
    counts = dict.fromkeys(slots, 0)
    for slot in slots:
        engine.set_running(slot)
    for _ in range(STEPS):
        chosen = [s for s in slots if rng.random() < 0.7]
        engine.append_step(chosen, [_token(s * STEPS + counts[s]) for s in chosen])
        for s in chosen:
            counts[s] += 1
    for slot in slots:
        engine.finish(slot, FinishReason.LENGTH)
    os._exit(0)


def test_poll_sees_counts_only_with_their_tokens_across_many_slots():
    spec = RegionSpec(num_slots=STEP_SLOTS, max_tokens_per_slot=STEPS + len(PROMPT))
    front = Region.create(f"t{os.getpid()}-{uuid.uuid4().hex[:8]}", spec)
    try:
        refs = [front.alloc_slot() for _ in range(STEP_SLOTS)]
        for slot, gen in refs:
            front.write_request(slot, PROMPT, SamplingParams(max_new_tokens=STEPS))
            front._tokens[slot, len(PROMPT) :] = -1  # poison the output cells
            front.submit(slot, gen)
        slots = [slot for slot, _ in refs]
        writer = mp.get_context("fork").Process(target=_step_writer, args=(front.name, slots, 3))
        writer.start()
        seen, polls, done = dict.fromkeys(slots, 0), 0, False
        while not done:
            states, _, counts = front.poll_outputs(np.array(slots, np.int64))
            done = all(st == SlotState.FINISHED for st in states.tolist())  # counts read after: final
            for slot, state, n in zip(slots, states.tolist(), counts.tolist(), strict=True):
                if state in (SlotState.RUNNING, SlotState.FINISHED):
                    assert n >= seen[slot]
                    got = front.read_tokens(slot, seen[slot], n)
                    assert got == [_token(slot * STEPS + i) for i in range(seen[slot], n)]
                    seen[slot] = n
            polls += 1
        writer.join(10)
        assert writer.exitcode == 0
        assert sum(seen.values()) > STEPS * STEP_SLOTS // 2 and polls > 10
        assert seen == {s: front.read_output(s).num_tokens for s in slots}
    finally:
        front.close()
        front.unlink()
