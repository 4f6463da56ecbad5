"""The prefix cache end to end: the real engine and model runner on tiny random models on the CPU
(Llama's attention and DeepSeek's MLA), conversations that share a system prompt and resend
themselves turn after turn. Greedy outputs with the cache equal those without it, also in a KV
pool far too small for the workload, where requests are preempted and resumed from the cache."""

from __future__ import annotations

import random

import pytest

from engine_harness import EngineHarness
from lightllm_async.config import EngineConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tools.make_random_model import shape_config, write_model
from lightllm_async.types import SamplingParams

MAX_LEN = 128
CONVERSATIONS, TURNS, NEW_TOKENS = 4, 3, 7


@pytest.fixture(scope="module", params=["tiny", "deepseek-v2-tiny"])
def runner(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    path = write_model(shape_config(request.param, "float32"), folder, seed=5)
    cfg = EngineConfig(
        model_path=path, device="cpu", max_model_len=MAX_LEN, kv_cache_tokens=2048, max_running_requests=8
    )
    return ModelRunner(cfg)


def chat(runner, prefix_cache: bool, kv_tokens: int | None = None, expected_output: int = 256):
    """TURNS waves of CONVERSATIONS requests; each wave starts when the last one ended and resends
    each conversation with the model's answer and a new question appended. Returns the outputs and
    cached lengths per wave, and the engine's stats."""
    h = EngineHarness(
        runner,
        max_model_len=MAX_LEN,
        max_running_requests=8,
        max_num_batched_tokens=24,  # prompts are prefilled in several chunks
        num_slots=CONVERSATIONS * TURNS,
        prefix_cache=prefix_cache,
        kv_cache_tokens=kv_tokens,
        expected_output_tokens=expected_output,
    )
    rng = random.Random(7)
    system = [rng.randrange(3, 512) for _ in range(30)]
    convs = [system + [rng.randrange(3, 512) for _ in range(4 + i)] for i in range(CONVERSATIONS)]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    waves = []
    try:
        for _ in range(TURNS):
            outs = h.step_until_done([h.submit(c, params) for c in convs])
            waves.append([(o.tokens, o.cached_tokens) for o in outs])
            convs = [
                c + o.tokens + [rng.randrange(3, 512) for _ in range(5)]
                for c, o in zip(convs, outs, strict=True)
            ]
        return waves, h.frontend.engine_stats()
    finally:
        h.close()


def tokens(waves):
    return [[t for t, _ in wave] for wave in waves]


def test_greedy_outputs_with_the_cache_equal_those_without_and_later_turns_hit(runner):
    without, stats_off = chat(runner, prefix_cache=False)
    with_cache, stats_on = chat(runner, prefix_cache=True)
    assert tokens(with_cache) == tokens(without)
    assert all(cached == 0 for wave in without for _, cached in wave)
    assert stats_off.cached_tokens_total == stats_off.prefix_queried_tokens_total == 0
    first, *later = with_cache
    assert any(cached >= 30 for _, cached in first)  # the system prompt, once a request computed it
    # A later turn reuses the whole previous turn: its prompt and the answer's computed tokens.
    for wave in later:
        for _, cached in wave:
            assert cached >= 30 + 4 + NEW_TOKENS - 1
    assert stats_on.cached_tokens_total == sum(c for wave in with_cache for _, c in wave)
    assert stats_on.kv_tokens_free == stats_on.kv_tokens_total  # cached tokens count as free


def test_a_pool_far_below_the_workload_completes_every_request_identically(runner):
    """128 slots for four conversations of up to ~90 tokens each, admitted on a guess of one
    output token: requests are preempted, and resume from what the cache kept of them."""
    reference, _ = chat(runner, prefix_cache=False)
    waves, stats = chat(runner, prefix_cache=True, kv_tokens=MAX_LEN, expected_output=1)
    assert tokens(waves) == tokens(reference)
    assert stats.num_preemptions > 0
    assert stats.kv_tokens_free == stats.kv_tokens_total == MAX_LEN


@pytest.mark.parametrize("flags", [(), ("--disable-prefix-cache",)], ids=["default", "disabled"])
def test_the_server_reports_cached_tokens_in_usage_unless_the_cache_is_disabled(flags):
    """The CLI flag reaches the engine, and the cached length reaches the client."""
    from serverproc import ServerProcess

    srv = ServerProcess("--model", "dummy", *flags)
    try:
        body = {"prompt": list(range(100, 140)), "max_tokens": 3}
        usages = [srv.request("POST", "/v1/completions", body)[2]["usage"] for _ in range(2)]
        want = 0 if flags else 39  # all but the last prompt token
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, want]
        metrics = srv.request("GET", "/metrics")[2]
        assert f"lightllm_async:prefix_cache_hits_total {float(want)}" in metrics
    finally:
        assert srv.stop() == 0
