"""A long random workload through the scheduler with the prefix cache, under a tiny KV pool:
arrivals that share prefixes, follow-up turns, chunked prefill, decode, finish, abort, failed
steps and preemption, driven synchronously or overlapped as the engine does on a GPU.

A fake device keeps a KV cache of token ids and the request-to-token rows, and samples a token
that depends on the whole context as read through them: a slot mapped wrong, freed while in use,
or handed to two owners changes the output. After every step the ownership invariants hold
(tests/kv_checks.py); at the end every request has finished, each with exactly its own tokens.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_checks import check_kv_ownership
from lightllm_async.batch import PENDING_TOKEN, Batch, Sampled
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.types import FinishReason, SamplingParams

VOCAB = 40


def model(context: list[int]) -> int:
    h = 17
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return 3 + h % VOCAB


class FakeDevice:
    """What a runner does with a batch, on token ids instead of tensors."""

    def __init__(self):
        self.kv: dict[int, int] = {}  # KV slot -> the token whose KV it holds
        self.rows: dict[int, dict[int, int]] = {}  # req_to_token: row -> position -> slot
        self.last: dict[int, int] = {}  # the previous launch's samples by request slot

    def run(self, batch: Batch) -> Sampled:
        out, sampled = [], {}
        for it in batch.items:
            row = self.rows.setdefault(it.row, {})
            for pos, kv_slot in enumerate(it.prefix_kv_slots):
                row[pos] = kv_slot
            for j, (tok, kv_slot) in enumerate(zip(it.token_ids, it.new_kv_slots, strict=True)):
                self.kv[kv_slot] = self.last[it.slot] if tok == PENDING_TOKEN else tok
                row[it.start + j] = kv_slot
            if it.samples:  # the logits of the last new token: a step without one samples nothing
                assert it.token_ids, "a request sampled without computing a token"
                n = it.start + len(it.token_ids)
                sampled[it.slot] = model([self.kv[row[p]] for p in range(n)])
                out.append(sampled[it.slot])
        self.last = sampled
        return Sampled(tuple(out))


def reference(prompt: list[int], params: SamplingParams, max_len: int) -> list[int]:
    seq, out = list(prompt), []
    while True:
        tok = model(seq)
        seq.append(tok)
        out.append(tok)
        if tok in params.stop_ids or len(out) >= params.max_new_tokens or len(seq) >= max_len:
            return out


class Workload:
    """Drives one scheduler the way the engine does and keeps the books."""

    def __init__(self, s: Scheduler, overlapped: bool):
        self.s, self.overlapped = s, overlapped
        self.device = FakeDevice()
        self.inflight: tuple[Batch, Sampled] | None = None  # launched, not applied (overlapped)
        self.requests: dict[int, Request] = {}  # by slot, every request ever added
        self.ended: dict[int, FinishReason] = {}
        self.next_slot = 0

    def add(self, prompt: list[int], params: SamplingParams) -> None:
        slot = self.next_slot
        self.next_slot += 1
        req = Request(slot=slot, gen=0, prompt_ids=prompt, params=params, arrival=slot)
        self.requests[slot] = req
        self.s.add(req)

    def abort(self, k: int) -> None:
        live = sorted(self.s.by_slot)
        if live:
            slot = live[k % len(live)]
            assert self.s.abort(slot) is not None
            self.ended[slot] = FinishReason.ABORT

    def step(self, fail: bool = False) -> bool:
        """One engine iteration: schedule, launch (maybe failing), complete the previous step."""
        batch = self.s.schedule()
        launched = None
        if batch is not None:
            sampled = self.device.run(batch)  # a failing step may have written KV before failing
            if fail:
                culprit = self.s.blame(batch)
                self.s.recover([batch] + ([self.inflight[0]] if self.inflight else []))
                self.inflight = None
                if culprit is not None:
                    self.ended[culprit.request.slot] = culprit.reason
                check_kv_ownership(self.s)
                return True
            launched = (batch, sampled)
        if self.overlapped:  # step N+1 was launched before step N's tokens are applied
            previous, self.inflight = self.inflight, launched
        else:
            previous = launched
        if previous is not None:
            _, finished = self.s.update(*previous)
            for f in finished:
                self.ended[f.request.slot] = f.reason
        check_kv_ownership(self.s)
        if not self.overlapped:
            assert all(len(r.kv_slots) == r.num_computed_tokens for r in self.s.running)
        return previous is not None or self.inflight is not None


def request_strategy(max_len: int):
    prompt_room = max_len - 1
    return st.tuples(
        st.integers(0, 3),  # shared prefix index (3: none)
        st.lists(st.integers(3, 3 + VOCAB - 1), min_size=1, max_size=max(1, prompt_room // 3)),
        st.integers(1, max_len),  # max_new_tokens, clipped to the context
        st.booleans(),  # a stop id
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workload_keeps_every_slot_in_one_place_and_every_output_exact(data):
    max_len = data.draw(st.integers(16, 40), "max_len")
    cfg = SchedulerConfig(
        max_running_requests=data.draw(st.integers(1, 6), "running"),
        max_num_batched_tokens=data.draw(st.integers(1, 40), "budget"),
        max_model_len=max_len,
        kv_cache_tokens=data.draw(st.integers(max_len, 3 * max_len), "kv"),
        expected_output_tokens=data.draw(st.integers(1, 16), "expected"),
        enable_prefix_cache=data.draw(st.sampled_from([True, True, True, False]), "cache"),
    )
    w = Workload(Scheduler(cfg), overlapped=data.draw(st.booleans(), "overlapped"))
    prefixes = [
        data.draw(st.lists(st.integers(3, 3 + VOCAB - 1), min_size=1, max_size=max_len // 2), "prefix")
        for _ in range(3)
    ]
    arrive = st.tuples(st.just("arrive"), request_strategy(max_len))
    follow_up = st.tuples(st.just("follow-up"), st.integers(0, 1000), request_strategy(max_len))
    rare = st.one_of(st.tuples(st.just("abort"), st.integers(0, 1000)), st.tuples(st.just("fail")))
    event = st.one_of(arrive, follow_up, arrive, follow_up, rare)
    for _ in range(data.draw(st.integers(20, 120), "steps")):
        fail = False
        for ev in data.draw(st.lists(event, max_size=3), "events"):
            if ev[0] == "arrive":
                prefix_idx, suffix, max_new, stop = ev[1]
                add_request(w, (prefixes[prefix_idx] if prefix_idx < 3 else []) + suffix, max_new, stop)
            elif ev[0] == "follow-up":  # the next turn resends the conversation so far
                done = [r for slot, r in w.requests.items() if w.ended.get(slot) is not None]
                if done:
                    r = done[ev[1] % len(done)]
                    _, suffix, max_new, stop = ev[2]
                    add_request(w, r.prompt_ids + r.output_ids + suffix, max_new, stop)
            elif ev[0] == "abort":
                w.abort(ev[1])
            elif ev[0] == "fail":
                fail = True
        w.step(fail=fail)
    # No more arrivals: everything finishes, within a bound (nothing starves).
    for _ in range(20_000):
        if not w.step():
            break
    assert not w.s.has_work()
    assert set(w.ended) == set(w.requests)
    for slot, req in w.requests.items():
        if w.ended[slot] in (FinishReason.ABORT, FinishReason.ERROR):
            continue
        want = reference(req.prompt_ids, req.params, max_len)
        assert req.output_ids == want, (slot, req.prompt_ids)
        stopped = want[-1] in req.params.stop_ids
        assert w.ended[slot] == (FinishReason.STOP if stopped else FinishReason.LENGTH)
    assert w.s.num_free_tokens == w.s.tokens.capacity and w.s.rows.num_free == w.s.rows.capacity


def add_request(w: Workload, prompt: list[int], max_new: int, stop: bool) -> None:
    max_len = w.s.cfg.max_model_len
    prompt = prompt[: max_len - 1]
    stop_ids = (model(prompt) + 1,) if stop else ()  # a token that may or may not come up
    params = SamplingParams(max_new_tokens=min(max_new, max_len - len(prompt)), stop_ids=stop_ids)
    w.add(prompt, params)
