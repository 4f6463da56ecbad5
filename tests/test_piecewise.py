"""Steps with prefill chunks padded to a token bucket, attention cut through static buffers
(runner/piecewise.py): the runner's piecewise path run in line on the CPU (`PiecewiseEager`, what
a CUDA replay does, graph parts run as Python) gives the plain path's tokens and logits, for
Llama and DeepSeek (whose mixed steps split decodes from prefill chunks inside the cut). The
graphs themselves are captured and replayed on the GPU (tests/test_runner_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from engine_harness import overlapped_generate
from lightllm_async.batch import Batch
from lightllm_async.config import EngineConfig
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.runner.piecewise import PiecewiseEager, token_buckets
from lightllm_async.tools.make_random_model import shape_config, write_model
from lightllm_async.types import SamplingParams

BUCKETS = [8, 24, 40, 64]  # irregular, so that most steps carry padding tokens


@pytest.fixture(scope="module", params=["tiny", "deepseek-v2-tiny", "deepseek-v3-tiny"])
def model_dir(request, tmp_path_factory):
    return write_model(
        shape_config(request.param, "float32"), str(tmp_path_factory.mktemp(request.param)), seed=3
    )


def _runner(path: str) -> ModelRunner:
    cfg = EngineConfig(
        model_path=path,
        device="cpu",
        dtype="float32",
        max_model_len=128,
        kv_cache_tokens=1024,
        max_running_requests=5,
        max_num_batched_tokens=64,
    )
    return ModelRunner(cfg)


def test_token_buckets():
    assert token_buckets(8192) == [*range(128, 2048, 128), *range(2048, 4096, 256), *range(4096, 8193, 512)]
    assert token_buckets(100) == [100]
    assert token_buckets(2100) == [*range(128, 2049, 128), 2100]


def test_padded_steps_give_the_plain_steps_tokens(model_dir):
    g = torch.Generator().manual_seed(7)
    # 9 prompts over 5 rows with a 64-token budget: prompts chunked, chunks beside decodes
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (70, 5, 33, 12, 1, 50, 9, 27, 3)]
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 4), temperature=0.0) for i in range(len(prompts))]
    plain_runner = _runner(model_dir)
    plain = overlapped_generate(plain_runner, prompts, params, [])
    runner = _runner(model_dir)
    runner.piecewise = PiecewiseEager(runner.model, runner.kv, runner.inputs, 64, buckets=BUCKETS)
    calls = []
    replay = runner.piecewise.replay
    runner.piecewise.replay = lambda bucket, ctx: (
        calls.append((bucket, ctx.positions.shape[0])) or replay(bucket, ctx)
    )
    batches: list[Batch] = []
    padded = overlapped_generate(runner, prompts, params, batches)
    assert padded == plain
    mixed = [b for b in batches if not b.decode_only]
    assert len(calls) == len(mixed) > 3
    assert any(any(len(it.token_ids) == 1 for it in b.items) for b in mixed)  # decodes beside chunks
    assert all(t <= bucket for bucket, t in calls) and any(t < bucket for bucket, t in calls)


def test_padded_step_logits_match_and_padding_touches_only_the_sink(model_dir):
    """One mixed step both ways on the same cache: equal logits; the padding tokens' k/v land in
    the sink slot only, so the real requests' cache rows are the plain step's."""
    plain, padded = _runner(model_dir), _runner(model_dir)
    padded.piecewise = PiecewiseEager(padded.model, padded.kv, padded.inputs, 64, buckets=BUCKETS)
    cache = (
        {"k": lambda r: r.kv.k, "v": lambda r: r.kv.v}
        if hasattr(plain.kv, "k")
        else {"kv": lambda r: r.kv.kv}
    )
    for get in cache.values():  # the pools start empty (whatever memory held): zero both
        for pool in (*get(plain), *get(padded)):
            pool.zero_()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (6, 17, 3, 4)]
    logits = []
    for runner in (plain, padded):
        sched = Scheduler(SchedulerConfig(5, 64, 128, runner.num_kv_tokens))
        for i, p in enumerate(prompts[:3]):
            sched.add(
                Request(
                    slot=i,
                    gen=0,
                    prompt_ids=p,
                    params=SamplingParams(max_new_tokens=3, temperature=0.0),
                    arrival=i,
                )
            )
        batch = sched.schedule()
        sched.update(batch, runner.execute(batch))
        sched.add(
            Request(
                slot=3,
                gen=0,
                prompt_ids=prompts[3],
                params=SamplingParams(max_new_tokens=2, temperature=0.0),
                arrival=3,
            )
        )
        batch = sched.schedule()  # three decodes and a new 4-token prompt
        assert not batch.decode_only and batch.num_tokens == 3 + 4
        step = runner.inputs.load(
            batch, runner._last_sampled, runner._last_index, pad_tokens_to=24 if runner is padded else 0
        )
        if runner is padded:
            x = runner.piecewise.replay(24, step.ctx)
            logits.append(runner.model.head_logits(x.index_select(0, step.ctx.logits_idx)))
        else:
            logits.append(runner.model(step.input_ids, step.ctx, runner.kv))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    sink = plain.num_kv_tokens
    for get in cache.values():
        for a, b in zip(get(plain), get(padded), strict=True):
            torch.testing.assert_close(b[:sink], a[:sink], rtol=1e-5, atol=1e-5)
            assert a[:sink].abs().sum() > 0


def test_capture_padding_fills_the_request_buffers_then_pads(model_dir):
    """What a capture warms up on: prefill chunks on the sink row as far as the request buffers
    reach (2 rows of 16 positions here), then padding of no request; the attention runs on the
    chunks, and every token's k/v goes to the sink slot."""
    cfg = EngineConfig(
        model_path=model_dir, device="cpu", dtype="float32", max_model_len=16, kv_cache_tokens=64,
        max_running_requests=2, max_num_batched_tokens=64,
    )  # fmt: skip
    runner = ModelRunner(cfg)
    eager = PiecewiseEager(runner.model, runner.kv, runner.inputs, 64, buckets=[64])
    real = runner.inputs.load_prefill_padding(64)
    assert real.host_q_lens == (16, 16) and real.positions.shape[0] == 32
    padded = eager.padded(real, 64)
    assert padded.kv_slots.tolist() == [runner.num_kv_tokens] * 64
    pools = [*runner.kv.k, *runner.kv.v] if hasattr(runner.kv, "k") else runner.kv.kv
    for pool in pools:
        pool[: runner.num_kv_tokens].zero_()
    x = eager.replay(64, real)
    assert x.shape[0] == 32 and torch.isfinite(eager.hidden).all()
    assert all(pool[: runner.num_kv_tokens].abs().sum() == 0 for pool in pools)


def test_capture_warms_up_a_mixed_step_too(model_dir):
    """The capture's extra warm-up: single-token requests first (a mixed step's decodes, through
    the decode path), then one chunk; with three request buffers the chunk takes what is left."""
    cfg = EngineConfig(
        model_path=model_dir, device="cpu", dtype="float32", max_model_len=16, kv_cache_tokens=64,
        max_running_requests=3, max_num_batched_tokens=64,
    )  # fmt: skip
    runner = ModelRunner(cfg)
    real = runner.inputs.load_prefill_padding(12, singles=2)
    assert real.host_q_lens == (1, 1, 10) and real.positions.shape[0] == 12
    assert real.by_query_len.single.host_q_lens == (1, 1)
    eager = PiecewiseEager(runner.model, runner.kv, runner.inputs, 16, buckets=[16])
    x = eager.replay(16, runner.inputs.load_prefill_padding(16, singles=3))
    assert x.shape[0] == 16 and torch.isfinite(x).all()
