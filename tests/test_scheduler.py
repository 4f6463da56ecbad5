"""The scheduler and KV pools alone: plain Python, a simulated runner, milliseconds per test."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from lightllm_async.batch import Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.ipc import FinishReason


@dataclass(frozen=True)
class Params:
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = -1


def make_sched(kv=4096, running=8, budget=64, max_len=512, expected=256) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_running_requests=running,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            kv_cache_tokens=kv,
            expected_output_tokens=expected,
        )
    )


def next_token(req: Request) -> int:
    """A deterministic 'model': the next token depends on the whole sequence so far."""
    return (sum(req.prompt_ids) + 7 * len(req.output_ids)) % 97 + 3


def run_to_end(s: Scheduler, max_steps=10_000):
    """Drive schedule/update like the engine does; check the KV invariants at every step."""
    done = {}
    for _ in range(max_steps):
        batch = s.schedule()
        if batch is None:
            break
        assert batch.num_tokens <= s.cfg.max_num_batched_tokens
        for it in batch.items:  # a step computes exactly the positions after the cached ones
            req = s.by_slot[it.slot]
            assert it.start == req.num_computed_tokens
            assert it.token_ids == tuple(req.token_ids(it.start, it.start + len(it.token_ids)))
        sampled = Sampled(tuple(next_token(s.by_slot[it.slot]) for it in batch.items if it.samples))
        for f in s.update(batch, sampled):
            done[f.request.slot] = (f.request.output_ids, f.reason)
        held = sum(len(r.kv_slots) for r in s.running)
        assert held + s.tokens.num_free == s.tokens.capacity
        for r in s.running:
            assert len(r.kv_slots) == r.num_computed_tokens
    assert not s.has_work()
    return done


def expected_output(prompt, n):
    req = Request(slot=0, gen=0, prompt_ids=list(prompt), params=None, arrival=0)
    for _ in range(n):
        req.output_ids.append(next_token(req))
    return req.output_ids


def test_requests_of_different_lengths_all_finish_with_their_own_tokens():
    s = make_sched()
    rng = random.Random(1)
    prompts = {i: [rng.randrange(1000) for _ in range(rng.randint(1, 150))] for i in range(20)}
    for i, p in prompts.items():
        s.add(Request(slot=i, gen=0, prompt_ids=p, params=Params(max_new_tokens=5 + i), arrival=i))
    done = run_to_end(s)
    assert set(done) == set(prompts)
    for i, p in prompts.items():
        out, reason = done[i]
        assert reason == FinishReason.LENGTH
        assert out == expected_output(p, 5 + i)
    assert s.tokens.num_free == s.tokens.capacity and s.rows.num_free == s.rows.capacity


def test_long_prompt_is_chunked_within_the_token_budget():
    s = make_sched(budget=16)
    s.add(Request(slot=0, gen=0, prompt_ids=list(range(50)), params=Params(max_new_tokens=2), arrival=0))
    chunks = []
    while (b := s.schedule()) is not None:
        chunks.append([len(it.token_ids) for it in b.items])
        sampled = Sampled(tuple(9 for it in b.items if it.samples))
        s.update(b, sampled)
    assert chunks == [[16], [16], [16], [2], [1]]


def test_stop_token_finishes_with_stop():
    s = make_sched()
    p = [5, 6, 7]
    stop = expected_output(p, 3)[2]
    s.add(Request(slot=3, gen=0, prompt_ids=p, params=Params(max_new_tokens=50, stop_ids=(stop,)), arrival=0))
    done = run_to_end(s)
    out, reason = done[3]
    assert reason == FinishReason.STOP and out[-1] == stop and len(out) <= 3


def test_full_cache_preempts_newest_and_recomputes_identically():
    # Tiny cache: the admission guess (expected 4 tokens) is wrong, so requests must be preempted.
    s = make_sched(kv=120, running=8, budget=64, max_len=100, expected=4)
    prompts = {i: [i * 3 + j for j in range(20)] for i in range(6)}
    for i, p in prompts.items():
        s.add(Request(slot=i, gen=0, prompt_ids=p, params=Params(max_new_tokens=30), arrival=i))
    done = run_to_end(s)
    assert s.num_preemptions > 0
    for i, p in prompts.items():
        assert done[i] == (expected_output(p, 30), FinishReason.LENGTH)


def test_abort_frees_kv_and_row_wherever_the_request_is():
    s = make_sched(running=1)
    s.add(Request(slot=0, gen=0, prompt_ids=[1] * 10, params=Params(max_new_tokens=10), arrival=0))
    s.add(Request(slot=1, gen=0, prompt_ids=[2] * 10, params=Params(max_new_tokens=10), arrival=1))
    b = s.schedule()
    s.update(b, Sampled((4,)))
    assert s.abort(1) is not None  # waiting
    assert s.abort(0) is not None  # running
    assert s.abort(0) is None
    assert not s.has_work()
    assert s.tokens.num_free == s.tokens.capacity and s.rows.num_free == 1


def test_cache_smaller_than_context_is_refused():
    with pytest.raises(ValueError):
        make_sched(kv=100, max_len=512)
