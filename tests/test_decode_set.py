"""The steady decode set (engine/decode_set.py) changes how the scheduler does its bookkeeping,
never what it decides: two schedulers, one with the set and one going request by request, driven
in lockstep through the same random workload (arrivals sharing prefixes, chunked prefill, stop
ids, min_tokens, log-probability requests that cannot join, aborts, failed steps, preemption on
a tiny pool, overlapped steps) hand the runner identical batches and end every request with
identical tokens.
"""

from __future__ import annotations

import random

import pytest

from kv_checks import check_kv_ownership
from lightllm_async.batch import Batch, Items, Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.types import SamplingParams
from test_prefix_cache_property import VOCAB, FakeDevice, model


class Lockstep:
    """One workload, two schedulers; every batch, token and finish compared as it happens."""

    def __init__(self, cfg: SchedulerConfig, overlapped: bool):
        self.s = [Scheduler(cfg), Scheduler(SchedulerConfig(**{**cfg.__dict__, "decode_set": False}))]
        assert self.s[0].decode is not None and self.s[1].decode is None
        self.devices = [FakeDevice(), FakeDevice()]
        self.overlapped = overlapped
        self.inflight: list[tuple[Batch, Sampled]] | None = None
        self.outputs: list[dict[int, list[int]]] = [{}, {}]
        self.ended: list[dict] = [{}, {}]
        self.runs = 0  # batches with a decode run, and their rows
        self.run_rows = 0

    def add(self, slot: int, prompt: list[int], params: SamplingParams) -> None:
        for s in self.s:
            s.add(Request(slot=slot, gen=0, prompt_ids=list(prompt), params=params, arrival=slot))

    def abort(self, k: int) -> None:
        live = sorted(self.s[0].by_slot)
        assert live == sorted(self.s[1].by_slot)
        if live:
            for s, ended in zip(self.s, self.ended, strict=True):
                ended[live[k % len(live)]] = "abort"
                assert s.abort(live[k % len(live)]) is not None

    def step(self, fail: bool) -> bool:
        batches = [s.schedule() for s in self.s]
        self._same_batch(*batches)
        launched = None
        if batches[0] is not None:
            sampled = [d.run(b) for d, b in zip(self.devices, batches, strict=True)]
            assert sampled[0] == sampled[1]
            if fail:
                for s, b, ended in zip(self.s, batches, self.ended, strict=True):
                    culprit = s.blame(b)
                    s.recover([b] + ([self.inflight[self.s.index(s)][0]] if self.inflight else []))
                    if culprit is not None:
                        ended[culprit.request.slot] = culprit.reason
                self.inflight = None
                return True
            launched = list(zip(batches, sampled, strict=True))
        if self.overlapped:
            previous, self.inflight = self.inflight, launched
        else:
            previous = launched
        if previous is not None:
            results = [s.update(b, t) for s, (b, t) in zip(self.s, previous, strict=True)]
            for (applied, finished), out, ended in zip(results, self.outputs, self.ended, strict=True):
                for slot, token in applied:
                    out.setdefault(slot, []).append(token)
                for f in finished:
                    ended[f.request.slot] = (f.reason, list(f.request.output_ids))
            # the same finishes in the same order (what admission learns from depends on it)
            assert [f.request.slot for f in results[0][1]] == [f.request.slot for f in results[1][1]]
        for s in self.s:
            check_kv_ownership(s)
        self._same_state()
        return previous is not None or self.inflight is not None

    def _same_batch(self, a: Batch | None, b: Batch | None) -> None:
        assert (a is None) == (b is None)
        if a is None:
            return
        assert a.step == b.step and tuple(a.items) == tuple(b.items)
        assert a.num_tokens == b.num_tokens and a.decode_only == b.decode_only
        if a.decode is not None:
            assert isinstance(a.items, Items) and a.items.rest == tuple(a.items)[len(a.decode) :]
            self.runs += 1
            self.run_rows += len(a.decode)

    def _same_state(self) -> None:
        a, b = self.s
        assert [r.slot for r in a.running] == [r.slot for r in b.running]
        assert [r.slot for r in a.waiting] == [r.slot for r in b.waiting]
        for ra, rb in zip(a.running, b.running, strict=True):
            assert (ra.num_pending, ra.num_computed_tokens, ra.output_ids, ra.kv_slots) == (
                rb.num_pending,
                rb.num_computed_tokens,
                rb.output_ids,
                rb.kv_slots,
            )
        assert a.num_preemptions == b.num_preemptions and a.kv.num_free == b.kv.num_free
        if a.decode is not None and len(a.decode):  # the set is the head of the running list
            members = [r.slot for r in a.running[: len(a.decode)]]
            assert members == [int(a.decode.slot[r]) for r in a.decode.rows]
            assert all(r.decode_set is a.decode for r in a.running[: len(a.decode)])
            # admission's reservation for the members, from the columns, as _peak computes it
            saved = a.output_lengths.expected
            for expected in (1, 3, saved, 10**6):
                a.output_lengths._expected = expected
                want = sum(max(a._peak(r) - len(r.kv_slots), 0) for r in a.running[: len(a.decode)])
                assert a.decode.reserved(expected) == want
            a.output_lengths._expected = saved


def random_params(rng: random.Random, prompt: list[int], max_len: int) -> SamplingParams:
    # now and then more than the context holds: the max_model_len limit ends it
    max_new = rng.randint(1, max_len - len(prompt) if rng.random() < 0.8 else 2 * max_len)
    kind = rng.random()
    stop_ids = tuple(rng.sample(range(3, 3 + VOCAB), rng.choice([0, 1, 1, 3])))
    return SamplingParams(
        max_new_tokens=max_new,
        stop_ids=stop_ids,
        min_tokens=rng.randint(0, max_new) if kind < 0.2 else 0,
        logprobs=0.2 <= kind < 0.3,  # these stay out of the set and hold back the ones after them
    )


@pytest.mark.parametrize("seed", range(24))
def test_decode_set_gives_the_same_batches_and_tokens_as_one_request_at_a_time(seed):
    rng = random.Random(seed)
    max_len = rng.randint(16, 48)
    cfg = SchedulerConfig(
        max_running_requests=rng.randint(1, 12),
        max_num_batched_tokens=rng.randint(1, 48),
        max_model_len=max_len,
        kv_cache_tokens=rng.randint(max_len, 4 * max_len),
        expected_output_tokens=rng.randint(1, 16),
        enable_prefix_cache=rng.random() < 0.75,
    )
    w = Lockstep(cfg, overlapped=rng.random() < 0.5)
    prefixes = [[rng.randrange(3, 3 + VOCAB) for _ in range(rng.randint(1, max_len // 2))] for _ in range(3)]
    slot = 0
    for _ in range(rng.randint(40, 160)):
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            head = rng.choice([*prefixes, []])
            prompt = (head + [rng.randrange(3, 3 + VOCAB) for _ in range(rng.randint(1, 12))])[: max_len - 1]
            w.add(slot, prompt, random_params(rng, prompt, max_len))
            slot += 1
        if rng.random() < 0.04:
            w.abort(rng.randrange(1000))
        w.step(fail=rng.random() < 0.02)
    for _ in range(20_000):
        if not w.step(fail=False):
            break
    assert not w.s[0].has_work() and not w.s[1].has_work()
    assert w.outputs[0] == w.outputs[1] and w.ended[0] == w.ended[1]
    assert len(w.ended[0]) == slot
    for s in w.s:
        assert s.num_free_tokens == s.tokens.capacity and s.rows.num_free == s.rows.capacity
    assert w.runs > 0 and w.run_rows > 0  # the set was used


def test_a_steady_batch_of_many_requests_is_one_decode_run():
    """With every running request decoding, the whole step is one run: no ScheduledReq built."""
    cfg = SchedulerConfig(
        max_running_requests=257, max_num_batched_tokens=4099, max_model_len=64, kv_cache_tokens=257 * 64
    )
    s = Scheduler(cfg)
    for i in range(257):
        params = SamplingParams(max_new_tokens=40)
        s.add(Request(slot=i, gen=0, prompt_ids=[3 + i, 5, 7, 11], params=params, arrival=i))
    device = FakeDevice()
    for _ in range(3):  # the prefill, then the first decode steps (members join as they go)
        batch = s.schedule()
        s.update(batch, device.run(batch))
    batch = s.schedule()
    assert batch.decode is not None and len(batch.decode) == 257 and batch.items.rest == ()
    assert batch.items._all is None  # not materialized by the scheduler
    s.update(batch, Sampled(tuple(model([i]) for i in range(257))))
    assert batch.items._all is None
    assert all(len(r.output_ids) == 4 and r.num_computed_tokens == 7 for r in s.running)
