"""The sampling parameters through the real engine and model runner (tiny random Llama, CPU):
they cross the region intact, and a seeded request gives the same tokens alone and in a busy
batch whatever the others ask for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_harness import EngineHarness, model_runner
from lightllm_async.ipc import Region, RegionSpec
from lightllm_async.types import SamplingParams

MAX_LEN = 256


@pytest.fixture(scope="module")
def runner(tiny_llama_path):
    return model_runner(tiny_llama_path, max_model_len=MAX_LEN)


def run(runner, requests: list[tuple[list[int], SamplingParams]], chunk: int = 64) -> list:
    h = EngineHarness(runner, max_model_len=MAX_LEN, max_running_requests=8, max_num_batched_tokens=chunk)
    try:
        refs = [h.submit(p, params) for p, params in requests]
        return h.step_until_done(refs)
    finally:
        h.close()


SEEDED = SamplingParams(
    max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, seed=2**63 + 5,
    repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.3, min_tokens=6,
    stop_ids=(2, 7), logit_bias=((11, 4.0), (12, -100.0), (13, 2.5)),
)  # fmt: skip


def crowd(n: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 512, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
        params = [
            SamplingParams(max_new_tokens=30, temperature=0.0, repetition_penalty=1.8),
            SamplingParams(max_new_tokens=17, seed=i, frequency_penalty=-1.0, logit_bias=((11, -100.0),)),
            SamplingParams(max_new_tokens=40, min_tokens=40, stop_ids=(2,), presence_penalty=2.0),
            SamplingParams(max_new_tokens=9, temperature=1.3, top_k=3),
        ][i % 4]
        out.append((prompt, params))
    return out


def test_seeded_request_with_every_parameter_is_the_same_alone_and_in_a_busy_batch(runner):
    prompt = [5, 9, 11, 11, 40, 12, 300, 5, 5]
    (alone,) = run(runner, [(prompt, SEEDED)])
    busy = crowd(7)
    together = run(runner, busy[:3] + [(prompt, SEEDED)] + busy[3:], chunk=37)
    assert together[3].tokens == alone.tokens
    assert len(alone.tokens) >= SEEDED.min_tokens
    assert all(t not in SEEDED.stop_ids for t in alone.tokens[: SEEDED.min_tokens])
    assert 12 not in alone.tokens  # a -100 bias is a ban in practice
    # the parameters change the draw: without them the same seed gives other tokens
    plain = dataclasses.replace(SEEDED, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    assert run(runner, [(prompt, plain)])[0].tokens != alone.tokens


def test_greedy_repetition_penalty_changes_the_greedy_path_and_min_tokens_holds(runner):
    prompt = [5, 9, 11, 11, 40]
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0)
    (base,) = run(runner, [(prompt, greedy)])
    (penalized,) = run(runner, [(prompt, dataclasses.replace(greedy, repetition_penalty=3.0))])
    assert penalized.tokens != base.tokens
    # a tiny random model repeats itself greedily; a strong repetition penalty breaks that
    assert len(set(penalized.tokens)) > len(set(base.tokens))
    stop = base.tokens[3]  # a token greedy decoding emits early: as a stop id it ends the output
    (stopped,) = run(runner, [(prompt, dataclasses.replace(greedy, stop_ids=(stop,)))])
    assert stopped.tokens[-1] == stop and len(stopped.tokens) <= 4
    held = dataclasses.replace(greedy, stop_ids=(stop,), min_tokens=12)
    (late,) = run(runner, [(prompt, held)])
    assert len(late.tokens) > 12 and stop not in late.tokens[:12]


def test_every_new_field_crosses_the_region():
    front = Region.create("xsamp-fields", RegionSpec(num_slots=2, max_tokens_per_slot=64))
    engine = Region.attach(front.name)
    try:
        params = dataclasses.replace(
            SEEDED, logprobs=True, top_logprobs=20, prompt_logprobs=True,
            logit_bias=tuple((i, (i % 201) - 100.0) for i in range(300)),
        )  # fmt: skip
        slot, gen = front.start_request([1, 2, 3], params)
        engine.drain_ring()
        assert engine.read_request(slot, gen).params == params
    finally:
        engine.close()
        front.close()
        front.unlink()
