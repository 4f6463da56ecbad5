"""The handoff of --pd, piece by piece and without processes: the slot's HANDOFF state in the
region, the prefill scheduler stopping a request at its first token with its KV slots, the decode
scheduler admitting a received request as a whole-prefix hit, the decode side taking transfers in
order with a KV reservation and a timeout, and the reader relaying a handoff. Milliseconds each."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from kv_checks import check_kv_ownership
from lightllm_async.batch import Sampled
from lightllm_async.engine.disagg import DecodeSide
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.ipc import HandoffView, Op, Region, RegionSpec, SlotState
from lightllm_async.types import FinishReason, SamplingParams

GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0)


@pytest.fixture
def region():
    """(frontend view, prefill engine view (replica 0), decode engine view (replica 1))."""
    front = Region.create(f"pd{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(7, 64, num_replicas=2))
    prefill, decode = Region.attach(front.name, 0), Region.attach(front.name, 1)
    yield front, prefill, decode
    prefill.close()
    decode.close()
    front.close()
    front.unlink()


def test_a_slot_passes_from_the_prefill_replica_to_the_decode_replica_with_its_first_token(region):
    front, prefill, decode = region
    slot, gen = front.start_request([5, 6, 7], GREEDY, replica=0, handoff_to=1)
    assert [r.op for r in prefill.drain_ring()] == [Op.SUBMIT] and prefill.handoff_target(slot) == 1
    prefill.set_running(slot)
    prefill.set_cached_tokens(slot, 2)
    prefill.append_tokens(slot, [41])
    assert front.relay_handoff(slot, gen, 1) is False  # not handed off yet
    assert prefill.hand_off(slot, seq=9)
    assert front.control(slot) == (SlotState.HANDOFF, gen)
    out = front.read_output(slot)
    assert out.tokens == [41] and not out.finished  # the first token is readable (it streams)
    with pytest.raises(RuntimeError):
        front.free_slot(slot, gen)  # an engine owns it
    assert front.relay_handoff(slot, gen, 1) and front.owner(slot) == 1
    assert decode.drain_ring() == [(slot, gen, Op.HANDOFF)] and prefill.drain_ring() == []
    view = decode.read_handoff(slot, gen)
    assert view == HandoffView(slot, gen, [5, 6, 7], view.params, [41], 0, 9, 2) and view.num_kv == 3
    assert decode.read_handoff(slot, gen + 1) is None
    assert decode.resume(slot) and not decode.resume(slot)
    decode.append_tokens(slot, [42])  # after the first, not over it
    front.abort(slot, gen)
    assert decode.drain_ring() == [(slot, gen, Op.ABORT)]  # to the decode replica now
    assert decode.finish(slot, FinishReason.ABORT)
    out = front.read_output(slot)
    assert out.tokens == [41, 42] and out.cached_tokens == 2 and out.finish_reason == FinishReason.ABORT


def test_the_decode_replica_may_end_a_slot_it_has_not_resumed(region):
    front, prefill, decode = region
    slot, gen = front.start_request([5], GREEDY, replica=0, handoff_to=1)
    prefill.set_running(slot)
    prefill.append_tokens(slot, [8])
    prefill.hand_off(slot, 0)
    assert front.abort(slot, gen)  # the flag, and a record for the owner (still the prefill replica)
    assert [r.op for r in prefill.drain_ring()] == [Op.SUBMIT, Op.ABORT]
    assert decode.finish(slot, FinishReason.ERROR)
    assert front.free_slot(slot, gen)


def _sched(kv: int = 256, budget: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(4, budget, 128, kv, expected_output_tokens=8))


def _step(s: Scheduler, token: int = 3):
    batch = s.schedule()
    sampled = Sampled(tuple(token for it in batch.items if it.samples))
    applied, finished = s.update(batch, sampled)
    check_kv_ownership(s)
    return batch, applied, finished


def test_the_prefill_scheduler_hands_off_after_the_first_token_with_every_computed_slot():
    s = _sched()
    prompt = list(range(10, 30))  # 20 tokens: three chunks of 8
    s.add(Request(slot=1, gen=0, prompt_ids=prompt, params=GREEDY, arrival=1, handoff_to=5))
    finished = []
    for _ in range(3):
        batch, applied, finished = _step(s, 77)
    assert applied == [(1, 77)] and len(finished) == 1
    f = finished[0]
    assert f.reason == FinishReason.NONE and len(f.handoff_kv) == 20 and f.request.output_ids == [77]
    assert not s.has_work() and s.schedule() is None and s.handing_off == [f.request]
    assert f.handoff_kv == tuple(f.request.kv_slots[:20])  # held while the engine sends them
    s.release_handoff(f.request)
    check_kv_ownership(s)
    assert s.num_free_tokens == s.kv.capacity  # the prompt stays cached only


def test_overlapped_steps_never_feed_the_first_token_of_a_request_to_hand_off():
    s = _sched()
    s.add(Request(slot=1, gen=0, prompt_ids=[1, 2, 3], params=GREEDY, arrival=1, handoff_to=0))
    assert s.schedule() is not None  # the whole prompt, its token pending
    assert s.schedule() is None  # a unified engine would feed the pending token here


def test_a_one_token_request_ends_on_the_prefill_replica():
    s = _sched()
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    s.add(Request(slot=1, gen=0, prompt_ids=[1, 2, 3], params=one, arrival=1, handoff_to=0))
    _, _, finished = _step(s)
    assert finished[0].reason == FinishReason.LENGTH and finished[0].handoff_kv == ()


def test_a_received_request_is_admitted_as_a_whole_prefix_hit_and_decodes_from_its_first_token():
    s = _sched()
    prompt = list(range(40, 60))
    slots = s.kv.allocate(len(prompt))
    req = Request(slot=2, gen=0, prompt_ids=prompt, params=GREEDY, arrival=1, output_ids=[9], cached_tokens=4)
    s.add_transferred(req, slots)
    check_kv_ownership(s)
    assert s.kv.cache.num_evictable == 0  # locked until admitted: no allocation may evict it
    batch, applied, _ = _step(s, 11)
    (item,) = batch.items
    assert item.start == 20 and item.token_ids == (9,) and item.prefix_kv_slots == tuple(slots)
    assert applied == [(2, 11)] and req.output_ids == [9, 11]
    assert req.cached_tokens == 4 and s.prefix_hit_tokens == 0  # the prefill replica's count stands
    assert s.first_admitted == []  # its queue time was the prefill replica's


def test_a_received_request_aborted_before_admission_unlocks_its_kv():
    s = _sched()
    slots = s.kv.allocate(12)
    s.add_transferred(Request(slot=2, gen=0, prompt_ids=list(range(12)), params=GREEDY, arrival=1,
                              output_ids=[9]), slots)  # fmt: skip
    assert s.abort(2) is not None
    check_kv_ownership(s)
    assert s.num_free_tokens == s.kv.capacity


class FakeReceiver:
    def __init__(self):
        self.started: list[tuple[int, int, int]] = []
        self.ready: set[int] = set()
        self.stored: list[tuple[int, list[int]]] = []

    def start(self, source, seq, n):
        self.started.append((source, seq, n))
        return seq

    def done(self, receipt):
        return receipt in self.ready

    def store(self, receipt, kv_slots):
        self.stored.append((receipt, kv_slots))


class FakeRegion:
    def __init__(self):
        self.views: dict[int, HandoffView] = {}
        self.aborted: set[int] = set()

    def read_handoff(self, slot, gen):
        return self.views.get(slot)

    def is_aborted(self, slot):
        return slot in self.aborted


class FakeEngine:
    def __init__(self, s: Scheduler):
        self.s, self.ended, self.admitted, self.n = s, [], [], 0

    def next_arrival(self):
        self.n += 1
        return self.n

    def end_request(self, slot, reason):
        self.ended.append((slot, reason))

    def admit_transferred(self, req, kv_slots):
        self.admitted.append(req.slot)
        self.s.add_transferred(req, kv_slots)


def _decode_side(kv=256, timeout=5.0):
    s, region, rx = _sched(kv), FakeRegion(), FakeReceiver()
    return DecodeSide(region, s, rx, timeout), s, region, rx, FakeEngine(s)


def _arrive(side, region, slot, seq, n_prompt=10, source=0):
    region.views[slot] = HandoffView(slot, 0, list(range(slot * 100, slot * 100 + n_prompt)), GREEDY, [7],
                                     source, seq, 0)  # fmt: skip
    side.arrived(slot, 0)


def test_transfers_from_one_prefill_replica_are_received_in_their_order_whatever_the_arrival_order():
    side, s, region, rx, eng = _decode_side()
    _arrive(side, region, slot=2, seq=1)
    side.progress(eng, now=0)
    assert rx.started == []  # seq 0 first: the sender sends in that order
    _arrive(side, region, slot=3, seq=0)
    side.progress(eng, now=0)
    assert rx.started == [(0, 0, 10), (0, 1, 10)]
    assert s.num_free_tokens == s.kv.capacity - 20  # reserved before the receives started
    rx.ready |= {1}
    side.progress(eng, now=1)
    assert eng.admitted == [2] and side.busy
    rx.ready |= {0}
    side.progress(eng, now=1)
    assert eng.admitted == [2, 3] and not side.busy
    check_kv_ownership(s)


def test_a_transfer_waits_for_kv_room_and_a_late_one_is_given_up_with_its_reservation():
    side, s, region, rx, eng = _decode_side(kv=128, timeout=5.0)
    held = s.kv.allocate(120)
    _arrive(side, region, slot=1, seq=0, n_prompt=10)
    side.progress(eng, now=0)
    assert rx.started == []  # no room: nothing posted, nothing reserved
    s.tokens.free(held)
    side.progress(eng, now=0)
    assert rx.started == [(0, 0, 10)]
    side.progress(eng, now=6)  # past the deadline
    assert eng.ended == [(1, FinishReason.ERROR)] and s.num_free_tokens == s.kv.capacity
    _arrive(side, region, slot=2, seq=1)  # the order with that peer is lost: refused
    side.progress(eng, now=6)
    assert eng.ended[-1] == (2, FinishReason.ERROR) and len(rx.started) == 1


def test_a_transfer_aborted_meanwhile_is_still_received_then_ends_and_frees_its_kv():
    side, s, region, rx, eng = _decode_side()
    _arrive(side, region, slot=4, seq=0)
    side.progress(eng, now=0)
    region.aborted.add(4)
    rx.ready.add(0)
    side.progress(eng, now=0)
    assert rx.stored and eng.ended == [(4, FinishReason.ABORT)] and eng.admitted == []
    assert s.num_free_tokens == s.kv.capacity


def test_the_reader_relays_a_handoff_to_the_chosen_decode_replica_and_fails_what_a_dead_prefill_fed(
    region, monkeypatch
):
    import asyncio

    from lightllm_async.frontend import reader as reader_mod
    from lightllm_async.frontend.reader import Reader

    monkeypatch.setattr(reader_mod, "LIVENESS_INTERVAL_S", 0.02)
    front, prefill, decode = region
    alive = [True, True]

    async def main() -> None:
        reader = Reader(front, lambda: all(alive), lambda: alive, pd_prefill=1)
        await reader.start()
        try:
            a, b = reader.submit([1, 2], GREEDY), reader.submit([3, 4], GREEDY)
            assert (a.replica, a.source, a.decode) == (0, 0, 1) and front.owner(a.slot) == 0
            assert decode.drain_ring() == []
            for rec in prefill.drain_ring():
                prefill.set_running(rec.slot)
                assert prefill.handoff_target(rec.slot) == 1
            prefill.append_tokens(a.slot, [9])
            prefill.hand_off(a.slot, 0)  # a is handed off, b still computes its prompt
            prefill.notify_frontend()
            assert await asyncio.wait_for(a.wait(), 2) == [9]  # the first token, before any decode
            for _ in range(200):  # the relay and the token may come in different wake-ups
                if a.replica == 1:
                    break
                await asyncio.sleep(0.01)
            assert decode.drain_ring() == [(a.slot, a.gen, Op.HANDOFF)]
            assert a.replica == 1 and front.owner(a.slot) == 1 and front.owner(b.slot) == 0
            assert reader._prefills.outstanding == [1] and reader._decodes.outstanding == [2]
            alive[0] = False  # the prefill replica dies: b (on it) and a (its KV came from it) fail
            await asyncio.sleep(0.2)
            assert a.engine_dead and b.engine_dead and a.replica == 0
            assert reader._prefills.outstanding == [0] and reader._decodes.outstanding == [0]
        finally:
            await reader.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_the_pd_flag_reaches_the_config_and_refuses_what_it_cannot_serve(tmp_path):
    from lightllm_async.server import _engine_processes, build_parser, resolve_config
    from lightllm_async.tools.make_random_model import make_random_model

    path = make_random_model("tiny", str(tmp_path), "float32", seed=1)
    cfg = resolve_config(build_parser().parse_args(["--model", path, "--pd", "prefill=2,decode=1"]))
    assert (cfg.dp, cfg.pd_prefill) == (3, 2)
    groups = _engine_processes(cfg, "/lla-x")
    roles = [g[0]._args[0].pd_role for g in groups]
    assert roles == ["prefill", "prefill", "decode"] and {g[0]._args[0].pd_world for g in groups} == {3}
    assert len({g[0]._args[0].pd_init for g in groups}) == 1
    for bad in (["--pd", "prefill=1"], ["--pd", "prefill=0,decode=1"], ["--pd", "prefill=1,decode=1,x=2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model", path, *bad])
    for other in (["--dp", "2"], ["--tp", "2"]):
        with pytest.raises(SystemExit):
            resolve_config(build_parser().parse_args(["--model", path, "--pd", "prefill=1,decode=1", *other]))


def test_an_abort_after_the_relay_reaches_the_decode_replica_even_before_it_resumes(region):
    front, prefill, decode = region
    slot, gen = front.start_request([5, 6], GREEDY, replica=0, handoff_to=1)
    prefill.drain_ring()
    prefill.set_running(slot)
    prefill.append_tokens(slot, [8])
    prefill.hand_off(slot, 0)
    front.relay_handoff(slot, gen, 1)
    assert not decode.is_aborted(slot)  # the decode replica looks, then may resume: the abort comes now
    front.abort(slot, gen)  # in HANDOFF still, as the frontend saw it: a record tells the replica anyway
    assert decode.drain_ring() == [(slot, gen, Op.HANDOFF), (slot, gen, Op.ABORT)]
    assert prefill.drain_ring() == []


def test_a_prefill_replica_keeps_a_handed_off_requests_kv_until_its_send_completed():
    from lightllm_async.engine.disagg import PrefillSide

    class Sender:
        def __init__(self):
            self.sent, self.finished = [], set()

        def send(self, dest, seq, kv_slots):
            self.sent.append((dest, seq, kv_slots))
            return seq

        def done(self, t):
            return t in self.finished

        def failure(self, t):
            return None

    class FakePrefillRegion:
        def set_cached_tokens(self, slot, n):
            pass

        def hand_off(self, slot, seq, source=None):
            pass

    class Engine:
        scheduler = Scheduler(SchedulerConfig(4, 64, 32, 48, expected_output_tokens=2))  # peaks of 20

    sender, eng = Sender(), Engine()
    s, side = eng.scheduler, PrefillSide(FakePrefillRegion(), sender)
    for slot in (1, 2):
        s.add(Request(slot=slot, gen=0, prompt_ids=list(range(slot, slot + 18)), params=GREEDY, arrival=slot,
                      handoff_to=3))  # fmt: skip
    _, _, finished = _step(s)
    for f in finished:
        side.hand_off(f)
    assert [(d, q) for d, q, _ in sender.sent] == [(3, 0), (3, 1)] and side.busy
    assert s.num_free_tokens == 48 - 36  # still theirs: being sent
    s.add(Request(slot=4, gen=0, prompt_ids=list(range(50, 68)), params=GREEDY, arrival=4, handoff_to=3))
    assert s.schedule() is None  # no room until a send completes: back-pressure, not more memory
    sender.finished.add(0)
    assert side.progress(eng) and side.busy
    check_kv_ownership(s)
    assert s.schedule() is not None  # the first request's KV went to the prefix cache: room again
    sender.finished.add(1)
    side.progress(eng)
    assert not side.busy and s.handing_off == []
    check_kv_ownership(s)


def test_a_dead_decode_replica_fails_the_requests_still_computing_their_prompt_for_it(region, monkeypatch):
    import asyncio

    from lightllm_async.frontend import reader as reader_mod
    from lightllm_async.frontend.reader import Reader

    monkeypatch.setattr(reader_mod, "LIVENESS_INTERVAL_S", 0.02)
    front, prefill, _ = region
    alive = [True, True]

    async def main() -> None:
        reader = Reader(front, lambda: all(alive), lambda: alive, pd_prefill=1)
        await reader.start()
        try:
            h = reader.submit([1, 2], GREEDY)
            prefill.set_running(prefill.drain_ring()[0].slot)
            alive[1] = False  # its KV would go nowhere: no point computing on
            await asyncio.sleep(0.2)
            assert h.engine_dead and h.replica == 1
        finally:
            await reader.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_request_preempted_while_its_first_token_was_in_flight_is_handed_off_after_its_recomputation():
    s = _sched(budget=64)
    prompt = list(range(100, 110))
    s.add(Request(slot=1, gen=0, prompt_ids=prompt, params=GREEDY, arrival=1, handoff_to=0))
    batch = s.schedule()  # the whole prompt, its first token in flight
    req = s.by_slot[1]
    s._preempt(req)  # the cache ran dry meanwhile
    applied, finished = s.update(batch, Sampled((50,)))
    assert applied == [(1, 50)] and finished == [] and req in s.waiting  # not handed off without its KV
    check_kv_ownership(s)
    _, applied, finished = _step(s, 51)  # recomputes (the prompt from the cache) and samples again
    assert applied == [(1, 51)] and len(finished) == 1
    assert req.output_ids == [50, 51] and len(finished[0].handoff_kv) == len(prompt) + 1


def test_nccl_messages_group_pools_of_one_dtype_under_the_cap_and_views_cover_them(monkeypatch):
    """On CUDA a transfer is one contiguous message per group of pools: both ends compute the same
    groups, a group never mixes dtypes nor (past its first pool) exceeds GROUP_BYTES, and the
    receiver's per-pool views tile its message exactly."""
    from lightllm_async.runner import kv_transfer as kt

    pools = [torch.zeros(40, 2, 16) for _ in range(5)] + [torch.zeros(40, 48, dtype=torch.bfloat16)] * 2
    monkeypatch.setattr(kt, "GROUP_BYTES", 3 * 9 * 2 * 16 * 4)  # three float32 pools of 9 rows
    groups = kt._groups(pools, 9)
    assert groups == [[0, 1, 2], [3, 4], [5, 6]]
    assert [i for g in groups for i in g] == list(range(len(pools)))
    for g in groups:
        flat, views = kt._flat_views(pools, g, 9)
        assert flat.dtype == pools[g[0]].dtype and flat.numel() == sum(v.numel() for v in views)
        assert [v.shape for v in views] == [(9, *pools[i].shape[1:]) for i in g]
        assert all(v.data_ptr() == flat.data_ptr() + sum(w.numel() for w in views[:k]) * flat.element_size()
                   for k, v in enumerate(views))  # fmt: skip


@pytest.mark.parametrize("seed", range(int(os.environ.get("LLA_STRESS_SEEDS", "3"))))
def test_every_stream_gets_each_token_once_through_handoffs_at_random_moments(seed):
    """The reader against a prefill and a decode engine running on their own threads with random
    pauses: many requests at once (the reader's numpy path), each handed off after its first token
    at a random moment, the decode engine appending one or several tokens per step and finishing
    some by a stop token, some by length. Every handle must receive exactly its tokens, in order,
    once, and end with its finish reason (a token repeated or lost across RUNNING -> HANDOFF ->
    RUNNING -> FINISHED would show here)."""
    import asyncio
    import random
    import threading
    import time

    from lightllm_async.frontend.reader import Reader

    rng = random.Random(seed)
    n_req = 40
    front = Region.create(f"pds{os.getpid()}-{uuid.uuid4().hex[:8]}", RegionSpec(24, 96, num_replicas=2))
    prefill, decode = Region.attach(front.name, 0), Region.attach(front.name, 1)
    want: dict[tuple[int, int], list[int]] = {}  # (slot, gen) -> the tokens the engines make
    lock = threading.Lock()
    stop = threading.Event()

    def tokens_for(slot: int, gen: int) -> list[int]:
        with lock:
            if (slot, gen) not in want:
                r = random.Random(slot * 1000 + gen)
                want[(slot, gen)] = [r.randrange(1, 500) for _ in range(r.randint(1, 12))]
            return want[(slot, gen)]

    def prefill_engine() -> None:
        seq = 0
        while not stop.is_set():
            for rec in prefill.drain_ring():
                if rec.op != Op.SUBMIT or not prefill.set_running(rec.slot):
                    continue
                time.sleep(rng.random() * 0.002)
                toks = tokens_for(rec.slot, rec.gen)
                prefill.append_tokens(rec.slot, toks[:1])
                if len(toks) == 1:
                    prefill.finish(rec.slot, FinishReason.LENGTH)
                else:
                    prefill.notify_frontend()
                    time.sleep(rng.random() * 0.002)  # the token is visible before the handoff
                    prefill.hand_off(rec.slot, seq)
                    seq += 1
                prefill.notify_frontend()
            time.sleep(0.0005)

    def decode_engine() -> None:
        running: dict[int, tuple[int, list[int], int]] = {}  # slot -> (gen, tokens, sent)
        while not stop.is_set() or running:
            for rec in decode.drain_ring():
                if rec.op == Op.HANDOFF and (view := decode.read_handoff(rec.slot, rec.gen)) is not None:
                    assert view.output_ids == tokens_for(rec.slot, rec.gen)[:1]
                    assert decode.resume(rec.slot)
                    running[rec.slot] = (rec.gen, tokens_for(rec.slot, rec.gen), 1)
            for slot, (gen, toks, sent) in list(running.items()):
                k = min(len(toks), sent + rng.randint(1, 3))
                if k > sent:
                    if k - sent == 1 or rng.random() < 0.5:
                        for t in toks[sent:k]:
                            decode.append_step([slot], [t])
                    else:
                        decode.append_tokens(slot, toks[sent:k])
                if k == len(toks):
                    decode.finish(slot, FinishReason.STOP if len(toks) % 2 else FinishReason.LENGTH)
                    del running[slot]
                else:
                    running[slot] = (gen, toks, k)
            decode.notify_frontend()
            time.sleep(rng.random() * 0.001)
            if stop.is_set() and not running:
                break

    async def client(reader: Reader, i: int) -> None:
        await asyncio.sleep(rng.random() * 0.05)
        while (h := reader.submit([1 + i, 2], GREEDY)) is None:
            await asyncio.sleep(0.002)  # every slot taken: wait for one
        key, got = (h.slot, h.gen), []
        while True:  # h.wait() awaited directly: through wait_for, a finish may land in between
            got += await h.wait()
            if h.finish_reason is not None or h.engine_dead:
                break
        assert not h.engine_dead
        toks = tokens_for(*key)
        assert got == toks, (key, got, toks)
        assert h.finish_reason == (
            FinishReason.LENGTH
            if len(toks) == 1
            else FinishReason.STOP
            if len(toks) % 2
            else FinishReason.LENGTH
        )

    async def main() -> None:
        reader = Reader(front, lambda: True, lambda: [True, True], pd_prefill=1)
        await reader.start()
        try:
            await asyncio.gather(*(client(reader, i) for i in range(n_req)))
            assert reader.num_active == 0
        finally:
            await reader.stop()

    threads = [threading.Thread(target=f, daemon=True) for f in (prefill_engine, decode_engine)]
    for t in threads:
        t.start()
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        prefill.close()
        decode.close()
        front.close()
        front.unlink()
