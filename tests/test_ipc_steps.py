"""The tensor-parallel step record (ipc/steps.py): a batch crosses the region intact, parameters
travel once per request, and rank 0 never overwrites a record a follower has not read."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightllm_async.batch import PENDING_TOKEN, Batch, DecodeRun, Items, ScheduledReq
from lightllm_async.ipc import Region, RegionSpec, steps
from lightllm_async.ipc.steps import StepReader, StepWriter, decode, encode, record_bytes
from lightllm_async.types import SamplingParams

PARAMS = [
    SamplingParams(max_new_tokens=8, temperature=0.0),
    SamplingParams(max_new_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=2**63 + 5, min_p=0.1),
    SamplingParams(
        max_new_tokens=9, repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=2.0,
        stop_ids=(2, 7), min_tokens=3, logit_bias=tuple((i, i / 7) for i in range(300)),
        logprobs=True, top_logprobs=20, prompt_logprobs=True,
    ),
]  # fmt: skip


@st.composite
def batches(draw):
    n = draw(st.integers(0, 12))
    items = []
    for slot in draw(st.lists(st.integers(0, 63), min_size=n, max_size=n, unique=True)):
        n_tok = draw(st.integers(1, 9))
        start = draw(st.integers(0, 50))
        toks = draw(st.lists(st.integers(-1, 2**31 - 1), min_size=n_tok, max_size=n_tok))
        prefix = tuple(range(start)) if draw(st.booleans()) else ()
        items.append(
            ScheduledReq(
                slot=slot,
                gen=draw(st.integers(0, 2**32 - 1)),
                epoch=draw(st.integers(0, 5)),
                row=draw(st.integers(0, 63)),
                start=start,
                token_ids=tuple(toks),
                new_kv_slots=tuple(draw(st.integers(0, 10**6)) for _ in toks),
                samples=draw(st.booleans()),
                params=draw(st.sampled_from(PARAMS)),
                num_output=draw(st.integers(0, 100)),
                prefix_kv_slots=prefix,
                prompt_len=draw(st.integers(0, 100)),
                next_token=draw(st.sampled_from([PENDING_TOKEN, 0, 12345])),
            )  # fmt: skip
        )
    return Batch(tuple(items), draw(st.integers(0, 2**40)))


@settings(max_examples=60, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=4))
def test_batches_round_trip_and_params_travel_once(seq):
    buf = bytearray(record_bytes(12, 12 * 9, 12 * 50))
    announced: dict = {}
    known: dict = {}
    for batch in seq:
        size = encode(batch, announced, buf, 0, len(buf))
        got = decode(buf, 0, known)
        assert got == batch
        assert (
            size
            < steps._HEADER_BYTES + 8 * 12 * 12 + 8 * 2 * 12 * 9 + 8 * 12 * 50 + 12 * steps.PARAMS_BYTES_BOUND
        )
    # a second record of the same requests carries no parameters
    if seq[-1].items:
        encode(seq[-1], announced, buf, 0, len(buf))
        assert steps._HEADER.unpack_from(buf, 0)[-1] == 0


def test_a_record_too_large_for_the_channel_is_refused():
    it = ScheduledReq(0, 0, 0, 0, 0, tuple(range(100)), tuple(range(100)), True, PARAMS[0], 0)
    with pytest.raises(ValueError, match="record needs"):
        encode(Batch((it,), 1), {}, bytearray(512), 0, 512)


def test_the_largest_params_fit_their_bound():
    assert len(steps._params_encoder.encode([(2**31, 2**32 - 1, PARAMS[2])])) < steps.PARAMS_BYTES_BOUND


@pytest.fixture
def region():
    spec = RegionSpec(num_slots=8, max_tokens_per_slot=64, step_channels=2, step_followers=2,
                      step_record=record_bytes(8, 64, 64))  # fmt: skip
    front = Region.create(f"t-steps-{uuid.uuid4().hex[:8]}", spec)
    yield front
    front.close()
    front.unlink()


def _batch(step: int, slot: int = 1) -> Batch:
    it = ScheduledReq(slot, 3, 0, slot, step, (step,), (100 + step,), True, PARAMS[step % 3], step)
    return Batch((it,), step)


def _follow(name: str, group: int, rank: int, out) -> None:
    eng = Region.attach(name)
    reader = StepReader(eng.step_channel(group), rank)
    got = []
    while (b := reader.next(timeout=10)) is not None:
        got.append(b)
    out.put([(b.step, b.items[0].token_ids, b.items[0].params) for b in got])
    eng.close()


def test_followers_in_other_processes_read_every_record_in_order(region):
    out = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_follow, args=(region.name, 1, r, out)) for r in (1, 2)]
    for p in procs:
        p.start()
    eng = Region.attach(region.name)
    writer = StepWriter(eng.step_channel(1))
    for step in range(1, 201):
        writer.publish(_batch(step))
    writer.stop()
    want = [(s, (s,), PARAMS[s % 3]) for s in range(1, 201)]
    assert out.get(timeout=60) == want and out.get(timeout=60) == want
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    eng.close()


def test_rank0_waits_for_a_slow_follower_before_reusing_a_buffer(region):
    eng = Region.attach(region.name)
    ch = eng.step_channel(0)
    writer, r1, r2 = StepWriter(ch), StepReader(ch, 1), StepReader(ch, 2)
    writer.publish(_batch(1))
    writer.publish(_batch(2))  # two records in flight: both buffers taken
    done = threading.Event()
    t = threading.Thread(target=lambda: (writer.publish(_batch(3)), done.set()))
    t.start()
    time.sleep(0.05)
    assert not done.is_set()  # buffer 1 % 2 still holds record 1, unread by both followers
    assert r1.next().step == 1
    time.sleep(0.05)
    assert not done.is_set()  # follower 2 has not read it either
    assert r2.next().step == 1
    t.join(5)
    assert done.is_set()
    assert [r1.next().step, r1.next().step] == [2, 3] == [r2.next().step, r2.next().step]
    with pytest.raises(TimeoutError):
        r1.next(timeout=0.01)
    eng.close()


def test_channels_of_two_groups_are_apart_and_bad_ranks_are_refused(region):
    eng = Region.attach(region.name)
    a, b = StepWriter(eng.step_channel(0)), StepWriter(eng.step_channel(1))
    a.publish(_batch(1, slot=1))
    b.publish(_batch(1, slot=2))
    assert StepReader(eng.step_channel(0), 1).next().items[0].slot == 1
    assert StepReader(eng.step_channel(1), 1).next().items[0].slot == 2
    with pytest.raises(ValueError):
        StepReader(eng.step_channel(0), 3)
    with pytest.raises(ValueError):
        eng.step_channel(2)
    eng.close()


def test_a_decode_run_is_written_as_the_record_of_its_items():
    """Rank 0 writes a decode run from its columns; followers must read the very record the
    run's items would make, parameters announced once per request as before."""
    np = pytest.importorskip("numpy")
    cols = {
        "slot": [4, 0, 9], "gen": [1, 0, 7], "epoch": [0, 2, 0], "row": [3, 1, 0], "start": [17, 5, 260],
        "token": [PENDING_TOKEN, 8, 12], "kv_slot": [900, 901, 77], "num_output": [3, 0, 250],
        "prompt_len": [14, 5, 11],
    }  # fmt: skip
    run = DecodeRun(
        **{k: np.array(v, np.int64) for k, v in cols.items()}, params=(PARAMS[0], PARAMS[1], PARAMS[0])
    )
    rest = (ScheduledReq(6, 2, 0, 2, 0, (5, 6, 7), (30, 31, 32), False, PARAMS[2], 0, (1, 2), 9, 8),)
    with_run = Batch(Items(run, rest), 11, decode=run)
    plain = Batch((*run.items(), *rest), 11)
    bufs, announced, known = [bytearray(record_bytes(8, 64, 64)) for _ in range(2)], [{}, {}], {}
    for _ in range(2):  # the second time no parameters travel
        pairs = zip((with_run, plain), announced, bufs, strict=True)
        sizes = [encode(b, a, buf, 0, len(buf)) for b, a, buf in pairs]
        assert sizes[0] == sizes[1] and bufs[0][: sizes[0]] == bufs[1][: sizes[1]]
        assert announced[0] == announced[1]
        assert with_run.items._all is None
        assert decode(bufs[0], 0, known).items == plain.items
