"""The scheduler and KV pools alone: plain Python, a simulated runner, milliseconds per test."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from kv_checks import check_kv_ownership
from lightllm_async.batch import PENDING_TOKEN, Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.types import FinishReason, SamplingParams


def Params(max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> SamplingParams:  # noqa: N802
    return SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids, temperature=0.0)


def make_sched(kv=4096, running=8, budget=64, max_len=512, expected=256, prefix_cache=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_running_requests=running,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            kv_cache_tokens=kv,
            expected_output_tokens=expected,
            enable_prefix_cache=prefix_cache,
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
        for f in s.update(batch, sampled)[1]:
            done[f.request.slot] = (f.request.output_ids, f.reason)
        check_kv_ownership(s)
        for r in s.running:
            assert len(r.kv_slots) == r.num_computed_tokens
    assert not s.has_work()
    return done


def run_overlapped(s: Scheduler, max_steps=10_000):
    """Drive the scheduler as the engine does on a GPU: step N+1 is scheduled before step N's
    tokens are known. A fake device samples the token for output position k as next_token would,
    and checks that each PENDING input is a token it sampled in the step just before."""
    done, inflight, last_sampled = {}, None, {}
    s.num_pending_inputs = 0
    for _ in range(max_steps):
        batch = s.schedule()
        launched = None
        if batch is not None:
            sampled_now = {}
            for it in batch.items:
                for tok in it.token_ids:
                    if tok == PENDING_TOKEN:
                        assert it.slot in last_sampled, "a pending input the last step did not sample"
                        s.num_pending_inputs += 1
                if it.samples:
                    req = s.by_slot[it.slot]
                    sampled_now[it.slot] = (sum(req.prompt_ids) + 7 * it.num_output) % 97 + 3
            last_sampled = sampled_now
            toks = tuple(sampled_now[it.slot] for it in batch.items if it.samples)
            launched = (batch, Sampled(toks))
        if inflight is not None:
            applied, finished = s.update(*inflight)
            for f in finished:
                done[f.request.slot] = (f.request.output_ids, f.reason)
        inflight = launched
        if inflight is None and not s.has_work():
            break
    assert not s.has_work()
    assert s.num_free_tokens == s.tokens.capacity and s.rows.num_free == s.rows.capacity
    return done


@pytest.mark.parametrize("kv,expected", [(4096, 256), (100, 4)])
def test_overlapped_steps_give_the_same_outputs_as_synchronous_ones(kv, expected):
    rng = random.Random(5)
    reqs = []
    for i in range(12):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
        out = expected_output(prompt, 40)
        stop = (out[rng.randrange(40)],) if i % 3 == 0 else ()
        reqs.append((i, prompt, Params(max_new_tokens=rng.randint(1, 30), stop_ids=stop)))
    results, scheds = [], []
    for driver in (run_to_end, run_overlapped):
        s = make_sched(kv=kv, running=6, budget=32, max_len=100, expected=expected)
        for i, prompt, params in reqs:
            s.add(Request(slot=i, gen=0, prompt_ids=prompt, params=params, arrival=i))
        results.append(driver(s))
        scheds.append(s)
    assert results[0] == results[1]
    assert scheds[1].num_pending_inputs > 50  # decode really ran ahead of the known tokens
    if kv == 100:
        assert scheds[1].num_preemptions > 0
    assert len(results[0]) == len(reqs)


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
    assert s.num_free_tokens == s.tokens.capacity and s.rows.num_free == s.rows.capacity


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
    assert s.num_free_tokens == s.tokens.capacity and s.rows.num_free == 1


def test_cache_smaller_than_context_is_refused():
    with pytest.raises(ValueError):
        make_sched(kv=100, max_len=512)


def _failing_step(s: Scheduler, slot_fails: int):
    """Schedule one step; 'run' it, failing if it holds `slot_fails`. Returns (batch, failed)."""
    batch = s.schedule()
    return batch, any(it.slot == slot_fails for it in batch.items)


def test_a_failed_step_is_undone_and_its_culprit_found_alone():
    """recover() requeues every request of the failed steps as a suspect with its KV freed; a suspect
    runs alone until it samples; blame() names it only when it failed alone."""
    s = make_sched(kv=2048, running=8, budget=64)
    prompts = {i: [i + 1] * (5 + i) for i in range(4)}
    for i, p in prompts.items():
        s.add(Request(slot=i, gen=0, prompt_ids=p, params=Params(max_new_tokens=6), arrival=i))
    batch, failed = _failing_step(s, slot_fails=2)
    assert failed and len(batch.items) == 4
    assert s.blame(batch) is None  # four requests: no culprit yet
    s.recover([batch])
    assert not s.running and s.num_free_tokens == s.tokens.capacity
    assert all(r.suspect and r.num_pending == 0 for r in s.waiting)
    done = {}
    while s.has_work():
        batch, failed = _failing_step(s, slot_fails=2)
        if batch is None:
            continue
        if failed:
            culprit = s.blame(batch)
            assert culprit is not None and culprit.request.slot == 2 and culprit.reason == FinishReason.ERROR
            s.recover([batch])
            continue
        if any(r.suspect for r in s.running + list(s.waiting)):
            assert len(batch.items) == 1  # suspects run alone
        sampled = Sampled(tuple(next_token(s.by_slot[it.slot]) for it in batch.items if it.samples))
        for f in s.update(batch, sampled)[1]:
            done[f.request.slot] = f.request.output_ids
    assert sorted(done) == [0, 1, 3]
    for i in done:
        assert done[i] == expected_output(prompts[i], 6)
    assert s.num_free_tokens == s.tokens.capacity and s.rows.num_free == s.rows.capacity


def test_scheduler_runs_with_torch_posix_ipc_and_the_c_extension_blocked():
    """The scheduler is plain Python in fact: import and drive it where those imports fail."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'posix_ipc', 'numpy') or name == 'lightllm_async._atomics':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from lightllm_async.batch import Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.types import SamplingParams
s = Scheduler(SchedulerConfig(max_running_requests=2, max_num_batched_tokens=8, max_model_len=64,
                              kv_cache_tokens=128))
s.add(Request(slot=0, gen=0, prompt_ids=[1] * 20, params=SamplingParams(max_new_tokens=3), arrival=0))
steps, out = 0, None
while (b := s.schedule()) is not None:
    steps += 1
    done = s.update(b, Sampled(tuple(7 for it in b.items if it.samples)))[1]
    out = done[0].request.output_ids if done else out
assert out == [7, 7, 7] and steps == 3 + 2, (out, steps)  # 20-token prompt in 8-token chunks
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'posix_ipc', 'numpy')]
print('ok')
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_admission_learns_the_expected_output_length_from_finished_requests():
    """Until 32 requests finished, admission reserves the configured 256 output tokens per
    request; once they finish after 8 tokens each, it reserves their 90th percentile instead and
    admits more requests into the same KV capacity."""

    def admitted(s: Scheduler) -> int:
        for i in range(8):
            s.add(
                Request(
                    slot=100 + i,
                    gen=0,
                    prompt_ids=[5 + i] * 40,  # distinct: none waits for another's prompt
                    params=Params(max_new_tokens=400),
                    arrival=100 + i,
                )
            )
        s.schedule()
        return len(s.running)

    fresh = make_sched(kv=1200, running=8, budget=512, max_len=512)
    assert admitted(fresh) == 4  # 1200 // (40 + 256)
    learned = make_sched(kv=1200, running=8, budget=512, max_len=512)
    for i in range(40):
        learned.add(Request(slot=i, gen=0, prompt_ids=[5] * 40, params=Params(max_new_tokens=8), arrival=i))
    run_to_end(learned)
    assert learned.output_lengths.expected == 8
    assert admitted(learned) == 8  # 1200 // (40 + 8) = 25, the rows allow 8


def test_learning_the_output_length_can_be_turned_off():
    s = Scheduler(
        SchedulerConfig(
            max_running_requests=8,
            max_num_batched_tokens=512,
            max_model_len=512,
            kv_cache_tokens=1200,
            learn_output_tokens=False,
        )
    )
    for i in range(40):
        s.add(Request(slot=i, gen=0, prompt_ids=[5] * 40, params=Params(max_new_tokens=8), arrival=i))
    run_to_end(s)
    assert s.output_lengths.expected == 256


def test_prompt_logprob_chunks_share_a_step_budget_and_stop_at_the_ring_limit():
    s = Scheduler(
        SchedulerConfig(
            max_running_requests=4, max_num_batched_tokens=64, max_model_len=128, kv_cache_tokens=1024,
            max_prompt_logprob_tokens=10,
        )
    )  # fmt: skip
    echo = SamplingParams(max_new_tokens=3, logprobs=True, prompt_logprobs=True, temperature=0.0)
    a = Request(slot=0, gen=0, prompt_ids=list(range(3, 33)), params=echo, arrival=0)
    b = Request(slot=1, gen=0, prompt_ids=list(range(3, 33)), params=echo, arrival=1)
    plain = Request(slot=2, gen=0, prompt_ids=list(range(3, 23)), params=Params(3), arrival=2)
    for r in (a, b, plain):
        s.add(r)
    batch = s.schedule()
    # the budget of 10 prompt-logprob rows goes to the first; the second waits, and the plain one
    # behind it (admission stays in arrival order)
    assert [(it.slot, len(it.token_ids)) for it in batch.items] == [(0, 10)]
    assert batch.items[0].next_token == 13 and list(batch.items[0].logprob_positions()) == list(range(1, 11))
    s.update(batch, Sampled(()))
    a.logprob_limit = 15  # the reader has room for positions below 15: chunks end at 14
    batch = s.schedule()
    assert [(it.slot, it.start, len(it.token_ids)) for it in batch.items] == [
        (0, 10, 4),
        (1, 0, 6),
        (2, 0, 20),
    ]
    s.update(batch, Sampled((50,)))
    a.logprob_limit = 14  # nothing fits: a is held, the others go on
    assert [(it.slot, it.start, len(it.token_ids)) for it in s.schedule().items] == [(1, 6, 10), (2, 20, 1)]


@pytest.mark.parametrize(
    "extra",
    [dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=-0.5),
     dict(logprobs=True, prompt_logprobs=True)],
)  # fmt: skip
def test_requests_that_read_their_whole_row_take_no_cached_prefix(extra):
    """Penalties count the tokens fed in the request's own row, prompt logprobs need every prompt
    position's logits: a cached prefix is fed to neither, so they compute their prompt in full."""
    s = make_sched()
    prompt = list(range(3, 43))
    s.add(Request(slot=0, gen=0, prompt_ids=prompt, params=Params(4), arrival=0))
    run_to_end(s)
    special = SamplingParams(max_new_tokens=4, temperature=0.0, **extra)
    for slot, params in ((1, special), (2, Params(4))):
        s.add(Request(slot=slot, gen=0, prompt_ids=prompt, params=params, arrival=slot))
    first = s.schedule()
    hits = {it.slot: it.start for it in first.items}
    assert hits == {1: 0, 2: len(prompt) - 1}


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_copies_of_one_prompt_wait_for_the_first_and_reuse_its_kv(prefix_cache):
    """n > 1 (or several clients sending one prompt at once): with the prefix cache the first copy
    computes the prompt while the others wait a step behind it, then take it from the cache and
    compute only its last token; a penalized copy (which takes no prefix) does not wait. Without the
    cache all start together."""
    s = make_sched(budget=256, prefix_cache=prefix_cache)
    prompt = list(range(3, 103))
    for slot in range(3):
        s.add(Request(slot=slot, gen=0, prompt_ids=prompt, params=Params(4), arrival=slot))
    penalized = SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=1.3)
    s.add(Request(slot=3, gen=0, prompt_ids=prompt, params=penalized, arrival=3))
    first = s.schedule()
    computed = sum(len(it.token_ids) for it in first.items)
    if not prefix_cache:
        assert [it.slot for it in first.items] == [0, 1, 2] and computed == 256  # the budget
        return
    assert [it.slot for it in first.items] == [0]  # FIFO: the copies wait, and so does slot 3
    s.update(first, Sampled((next_token(s.by_slot[0]),)))
    second = s.schedule()
    starts = {it.slot: (it.start, len(it.token_ids)) for it in second.items}
    assert starts[1] == starts[2] == (99, 1)  # the cached prompt but its last token
    assert starts[3] == (0, 100)  # penalized: the whole prompt, in its own row
    s.update(second, Sampled(tuple(next_token(s.by_slot[it.slot]) for it in second.items if it.samples)))
    done = run_to_end(s)
    assert done[0][0] == done[1][0] == done[2][0]
