"""The runner's persistent step inputs on the CPU: what one upload puts where, padding included,
and that the eager path and the CUDA-graph path read the very same buffers.

A CUDA graph replays the kernels it captured on `InputBuffers.context(bucket)`; on the CPU the
same model run on those views stands in for the replay.
"""

from __future__ import annotations

import pytest
import torch

from lightllm_async.batch import PENDING_TOKEN, Batch, DecodeRun, Items, ScheduledReq, sampling_slots
from lightllm_async.config import EngineConfig
from lightllm_async.runner.cuda_graph import graph_buckets
from lightllm_async.runner.inputs import InputBuffers, flatten
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.runner.staging import Staging
from lightllm_async.tools.make_random_model import shape_config, write_model
from lightllm_async.types import SamplingParams

SINK_SLOT, SINK_ROW = 99, 4


def item(slot, row, start, tokens, kv, samples=True, params=None, num_output=0) -> ScheduledReq:
    return ScheduledReq(
        slot=slot,
        gen=0,
        epoch=0,
        row=row,
        start=start,
        token_ids=tuple(tokens),
        new_kv_slots=tuple(kv),
        samples=samples,
        params=params or SamplingParams(temperature=0.0),
        num_output=num_output,
    )


def buffers(max_tokens=16, max_batch=4) -> InputBuffers:
    return InputBuffers(
        max_tokens, max_batch, torch.zeros(max_batch + 1, 32, dtype=torch.int32), SINK_SLOT, SINK_ROW
    )


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype


def test_decode_batch_padded_to_a_bucket_fills_sink_rows_and_pending_tokens():
    buf = buffers()
    last_sampled = torch.tensor([500, 600, 700])
    batch = Batch(
        items=(
            item(slot=7, row=2, start=5, tokens=[PENDING_TOKEN], kv=[40], num_output=1),
            item(slot=3, row=0, start=9, tokens=[123], kv=[41], params=SamplingParams(seed=2**64 - 1)),
        ),
        step=1,
    )
    step = buf.load(batch, last_sampled, last_index={7: 2, 3: 0}, pad_to=4)
    ctx = step.ctx
    assert step.input_ids.tolist() == [700, 123, 0, 0]  # pending filled from the previous samples
    assert ctx.positions.tolist() == [5, 9, 0, 0]
    assert ctx.kv_slots.tolist() == [40, 41, SINK_SLOT, SINK_SLOT]
    assert ctx.req_idx.tolist() == [2, 0, SINK_ROW, SINK_ROW]
    assert ctx.seq_lens.tolist() == [6, 10, 1, 1]
    assert ctx.q_start.tolist() == [0, 1, 2, 3, 4]
    assert ctx.logits_idx.tolist() == [0, 1, 2, 3]
    assert ctx.decode_only and step.num_samples == 2
    table = buf.req_to_token
    assert table[2, 5] == 40 and table[0, 9] == 41 and table[SINK_ROW, 0] == SINK_SLOT
    assert (table[SINK_ROW, 1:] == 0).all()  # padding never writes the table
    # Sampling metadata: two rows (padding excluded), the seed's 64 bits as int64.
    assert step.sampling.greedy.tolist() == [True, False]
    assert step.sampling.seed.tolist() == [-1] and step.sampling.seeded_rows.tolist() == [1]


def test_graph_views_are_the_buffers_every_step_loads():
    buf = buffers()
    captured = buf.context(4, 4, 4, decode_only=True)  # what a graph of 4 rows is captured on
    decode = Batch(items=(item(1, 0, 3, [11], [20]), item(2, 1, 6, [12], [21])), step=1)
    step = buf.load(decode, torch.empty(0, dtype=torch.int64), {}, pad_to=4)
    for name in ("positions", "kv_slots", "req_idx", "q_start", "seq_lens", "logits_idx"):
        assert same_memory(getattr(step.ctx, name), getattr(captured, name)), name
    assert same_memory(step.input_ids, buf.input_ids)
    assert step.ctx.req_to_token is buf.req_to_token
    # A prefill step (eager) lands in the same buffers: one owner for both paths.
    prefill = Batch(
        items=(item(1, 0, 0, [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]), item(2, 1, 6, [13], [22])), step=2
    )
    step = buf.load(prefill, torch.empty(0, dtype=torch.int64), {})
    assert same_memory(step.ctx.positions, captured.positions) and same_memory(step.input_ids, buf.input_ids)
    assert step.input_ids.tolist() == [5, 6, 7, 8, 9, 13]
    assert step.ctx.positions.tolist() == [0, 1, 2, 3, 4, 6]
    assert step.ctx.q_start.tolist() == [0, 5, 6] and step.ctx.seq_lens.tolist() == [5, 7]
    assert step.ctx.logits_idx.tolist() == [4, 5] and not step.ctx.decode_only
    assert buf.req_to_token[0, :5].tolist() == [0, 1, 2, 3, 4]


def test_packed_contexts_hold_every_requests_cache_rows_in_order_once_per_step():
    buf = buffers()
    buf.req_to_token[2, :4] = torch.tensor([70, 71, 72, 73], dtype=torch.int32)  # cached prefix
    batch = Batch(
        items=(
            item(1, 2, 4, [5, 6, 7], [80, 81, 82]),  # a chunk after 4 cached tokens
            item(2, 0, 0, [8], [90]),  # a one-token prompt
            item(3, 3, 0, [9, 10], [91, 92]),
        ),
        step=1,
    )
    ctx = buf.load(batch, torch.empty(0, dtype=torch.int64), {}).ctx
    assert ctx.host_seq_lens == (7, 1, 2)
    packed = ctx.packed
    assert packed is ctx.packed  # built once, whichever layer asks first
    assert packed.rows.tolist() == [70, 71, 72, 73, 80, 81, 82, 90, 91, 92]
    assert packed.req_idx.tolist() == [0, 1, 2] and packed.req_to_token.shape == (3, 7)
    for b, n in enumerate(ctx.host_seq_lens):  # the packed table leads back to the same rows
        assert (
            packed.rows[packed.req_to_token[b, :n].long()].tolist()
            == buf.req_to_token[ctx.req_idx[b], :n].tolist()
        )
    with pytest.raises(ValueError, match="host_seq_lens"):
        _ = buf.context(4, 4, 4, decode_only=True).packed  # a graph's context: lengths unknown


def test_a_prefix_cache_hit_maps_the_cached_slots_before_the_new_tokens():
    """A request admitted with a hit computes from `start`; positions [0, start) of its row get the
    cache's slots in the same upload, whatever the row held for its previous request."""
    buf = buffers()
    buf.req_to_token[1, :6] = torch.tensor([9, 9, 9, 9, 9, 9], dtype=torch.int32)  # a stale row
    hit = item(5, 1, 4, [21, 22], [60, 61])
    hit = hit._replace(prefix_kv_slots=(33, 7, 12, 40))
    batch = Batch(items=(item(2, 0, 3, [11], [50]), hit), step=1)
    step = buf.load(batch, torch.empty(0, dtype=torch.int64), {}, pad_to=0)
    assert buf.req_to_token[1, :6].tolist() == [33, 7, 12, 40, 60, 61]
    assert buf.req_to_token[0, 3] == 50
    assert step.ctx.positions.tolist() == [3, 4, 5] and step.ctx.seq_lens.tolist() == [4, 6]
    assert step.ctx.kv_slots.tolist() == [50, 60, 61]  # only the new tokens are written to the cache


def test_a_smaller_step_after_a_larger_one_sees_only_its_own_rows():
    buf = buffers()
    big = Batch(items=tuple(item(i, i, 2, [30 + i], [50 + i]) for i in range(4)), step=1)
    buf.load(big, torch.empty(0, dtype=torch.int64), {}, pad_to=4)
    small = Batch(items=(item(9, 3, 8, [77], [60]),), step=2)
    step = buf.load(small, torch.empty(0, dtype=torch.int64), {}, pad_to=2)
    assert step.input_ids.tolist() == [77, 0]
    assert step.ctx.kv_slots.tolist() == [60, SINK_SLOT] and step.ctx.req_idx.tolist() == [3, SINK_ROW]
    # The bucket-4 graph would read rows 2..3 left by the big step; a bucket-2 step never replays it.
    assert buf.context(4, 4, 4, True).kv_slots.tolist()[:2] == [60, SINK_SLOT]


def test_a_step_larger_than_the_buffers_is_refused():
    buf = buffers(max_tokens=8)
    batch = Batch(items=(item(1, 0, 0, list(range(9)), list(range(9))),), step=1)
    with pytest.raises(ValueError, match="overflow"):
        buf.load(batch, torch.empty(0, dtype=torch.int64), {})


def test_staging_uploads_only_what_was_put_in_few_copies():
    sections = {
        "a": (torch.int32, 8),
        "b": (torch.int64, 8),
        "wide": (torch.int64, 100_000),
        "c": (torch.int64, 8),
    }
    st = Staging(sections, torch.device("cpu"))
    st.put("c", [5, 6])
    st.put("a", [1, 2, 3])
    st.put("b", [4])
    spans = st.spans()
    assert len(spans) == 2  # a and b merge across their short gap; c lies beyond 800 KB left unput
    assert spans[0] == (0, 256 + 8) and spans[1][1] - spans[1][0] == 16
    st.upload()
    assert st.view("a", 3).tolist() == [1, 2, 3] and st.view("c", 2).tolist() == [5, 6]
    st.put("a", [9])  # the other host mirror: the device keeps the rest of the last step
    st.upload()
    assert st.view("a", 3).tolist() == [9, 2, 3] and st.view("b", 1).tolist() == [4]


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    path = write_model(shape_config("tiny", "float32"), str(tmp_path_factory.mktemp("tiny")), seed=11)
    cfg = EngineConfig(
        model_path=path, device="cpu", max_model_len=64, kv_cache_tokens=256, max_running_requests=6
    )
    return ModelRunner(cfg)


def test_padded_graph_inputs_give_the_eager_logits_and_touch_only_the_sink(tiny_runner):
    """The graph path on the CPU: the model run on a bucket's captured views, after a padded load."""
    runner = tiny_runner
    assert graph_buckets(6) == [1, 2, 4, 6]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 7, 12)]
    starts = [0, 3, 10]  # cache slots: request i owns starts[i] .. starts[i] + len + 1
    prefill = Batch(
        items=tuple(
            item(i, i, 0, p, range(s, s + len(p)))
            for i, (p, s) in enumerate(zip(prompts, starts, strict=True))
        ),
        step=1,
    )
    first = runner.execute(prefill).token_ids
    decode = Batch(
        items=tuple(
            item(i, i, len(p), [t], [s + len(p)])
            for i, (p, s, t) in enumerate(zip(prompts, starts, first, strict=True))
        ),
        step=2,
    )
    kv_before = [k.clone() for k in runner.kv.k]
    step = runner.inputs.load(decode, runner._last_sampled, runner._last_index, pad_to=4)
    padded = runner.model(runner.inputs.input_ids[:4], runner.inputs.context(4, 4, 4, True), runner.kv)
    step = runner.inputs.load(decode, runner._last_sampled, runner._last_index)
    eager = runner.model(step.input_ids, step.ctx, runner.kv)
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    changed = {s + len(p) for p, s in zip(prompts, starts, strict=True)} | {runner.num_kv_tokens}
    for before, after in zip(kv_before, runner.kv.k, strict=True):
        same = (before == after) | (before.isnan() & after.isnan())  # the cache starts as torch.empty
        diff = (~same).flatten(1).any(-1).nonzero().flatten().tolist()
        assert set(diff) <= changed and runner.num_kv_tokens in diff  # the sink, and the new tokens


def test_a_decode_run_loads_exactly_as_the_same_items_one_by_one():
    """The runner reads a decode run's columns (flatten, sampling rows) instead of building its
    ScheduledReqs: the uploaded step must be the one the items would give."""
    np = pytest.importorskip("numpy")
    seeded, greedy = SamplingParams(temperature=0.7, seed=5, min_tokens=4, stop_ids=(9,)), SamplingParams()
    penalized = SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2)
    cols = {  # 3 rows; rows 0 and 2 feed the previous step's sample
        "slot": [7, 3, 11], "gen": [0, 2, 1], "epoch": [0, 0, 1], "row": [2, 0, 1], "start": [5, 9, 3],
        "token": [PENDING_TOKEN, 123, PENDING_TOKEN], "kv_slot": [40, 41, 42], "num_output": [1, 6, 0],
        "prompt_len": [4, 3, 3],
    }  # fmt: skip
    run = DecodeRun(**{k: np.array(v, np.int64) for k, v in cols.items()}, params=(seeded, greedy, penalized))
    prefill = item(slot=5, row=3, start=0, tokens=[1, 2, 3], kv=[50, 51, 52], params=greedy)
    with_run = Batch(items=Items(run, (prefill,)), step=1, decode=run)
    plain = Batch(items=(*run.items(), prefill), step=1)
    assert plain.items[0] == item(7, 2, 5, [PENDING_TOKEN], [40], params=seeded, num_output=1)._replace(
        prompt_len=4
    )
    last_sampled, last_index = torch.tensor([500, 600, 700]), {7: 2, 3: 0, 11: 1}
    assert flatten(with_run, last_index) == flatten(plain, last_index)
    a, b = (buffers(max_tokens=16, max_batch=8).load(x, last_sampled, last_index) for x in (with_run, plain))
    assert with_run.items._all is None  # the runner read the run as columns
    assert tuple(with_run.items) == plain.items
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.num_samples == b.num_samples == 4
    for name in ("positions", "kv_slots", "req_idx", "q_start", "seq_lens", "logits_idx"):
        assert getattr(a.ctx, name).tolist() == getattr(b.ctx, name).tolist(), name
    assert a.sampling.max_seq_len == b.sampling.max_seq_len == 4  # row 2: 3 + 1 known after the step
    fields = ("temperature", "seeded_rows", "position", "ban_rows", "ban_ids", "greedy", "pen_rows")
    for f in (*fields, "pen_table_rows", "prompt_len", "seq_len", "presence", "repetition"):
        assert getattr(a.sampling, f).tolist() == getattr(b.sampling, f).tolist(), f
    assert sampling_slots(with_run) == sampling_slots(plain) == [7, 3, 11, 5]


def test_decode_only_steps_carry_their_requests_longest_first_where_asked():
    """`order_decode_rows` (the CUDA runner): a decode-only step's context has `decode_order`, the
    requests by context length, longest first, padding rows (one token) last; from a decode run's
    columns as from items one by one; in the buffer a graph was captured on. Steps with a prefill
    chunk, and buffers not asked to, have none."""
    np = pytest.importorskip("numpy")
    buf = InputBuffers(16, 8, torch.zeros(9, 32, dtype=torch.int32), SINK_SLOT, 8, order_decode_rows=True)
    captured = buf.context(8, 8, 8, decode_only=True)
    items = (item(1, 0, 3, [11], [20]), item(2, 1, 9, [12], [21]), item(3, 2, 5, [13], [22]))
    decode = Batch(items=items, step=1)
    step = buf.load(decode, torch.empty(0, dtype=torch.int64), {}, pad_to=5)
    assert step.ctx.seq_lens.tolist() == [4, 10, 6, 1, 1]
    assert step.ctx.decode_order.tolist() == [1, 2, 0, 3, 4]
    assert step.ctx.decode_spread.tolist() == [1]  # 10 against a mean of 6.7 (the padding not counted)
    assert same_memory(step.ctx.decode_order, captured.decode_order)
    assert same_memory(step.ctx.decode_spread, captured.decode_spread)
    cols = {
        "slot": [1, 2, 3, 4], "gen": [0] * 4, "epoch": [0] * 4, "row": [0, 1, 2, 3], "start": [9, 8, 9, 11],
        "token": [11, 12, 13, 14], "kv_slot": [20, 21, 22, 23], "num_output": [1] * 4, "prompt_len": [2] * 4,
    }  # fmt: skip
    run = DecodeRun(**{k: np.array(v, np.int64) for k, v in cols.items()}, params=(SamplingParams(),) * 4)
    step = buf.load(Batch(items=Items(run, ()), step=2, decode=run), torch.empty(0, dtype=torch.int64), {})
    assert step.ctx.decode_order.tolist() == [3, 0, 2, 1]  # ties keep their order
    assert step.ctx.decode_spread.tolist() == [0]  # 12 against a mean of 10.25
    mixed = Batch(items=(item(1, 0, 0, [5, 6, 7], [0, 1, 2]), item(2, 1, 9, [12], [21])), step=3)
    assert buf.load(mixed, torch.empty(0, dtype=torch.int64), {}).ctx.decode_order is None
    buf.load_padding(3)
    assert captured.decode_order[:3].tolist() == [0, 1, 2] and captured.decode_spread.tolist() == [0]
    plain = buffers().load(decode, torch.empty(0, dtype=torch.int64), {}, pad_to=4)
    assert plain.ctx.decode_order is None
