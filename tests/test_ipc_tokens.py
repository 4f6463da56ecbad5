"""Token publishing: a reader in another process never sees a count ahead of the tokens it covers."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import uuid

import pytest

from lightllm_async.ipc import FinishReason, Region, RegionSpec, RequestParams, atomics

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
    if not atomics.IS_NATIVE:
        pytest.skip("needs the compiled atomics")
    spec = RegionSpec(num_slots=2, max_tokens_per_slot=TOTAL + len(PROMPT))
    front = Region.create(f"t{os.getpid()}-{uuid.uuid4().hex[:8]}", spec)
    try:
        slot, gen = front.alloc_slot()
        front.write_request(slot, PROMPT, RequestParams(max_new_tokens=TOTAL, logprobs=True))
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
