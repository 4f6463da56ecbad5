"""Log-probabilities through the real engine and runner (tiny random Llama, CPU, fp32) against HF
transformers' log-softmax on the same weights: generated tokens' and prompt tokens' (echo), the
top-k beside them, and that penalties and temperature do not change what is reported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import EngineHarness, generate_with_logprobs, model_runner
from lightllm_async.types import SamplingParams

MAX_LEN = 256
TOL = 2e-4


@pytest.fixture(scope="module")
def runner(tiny_llama_path):
    return model_runner(tiny_llama_path, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def hf(tiny_llama_path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row q is the log-softmax that predicts token q + 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def check_against_hf(hf, prompt, out, first, chosen, top_ids, top_lp):
    seq = prompt + out.tokens
    ref = hf_logprobs(hf, seq)
    for i, q in enumerate(range(first, len(seq))):
        row = ref[q - 1]
        assert abs(chosen[i] - row[seq[q]].item()) < TOL, (q, chosen[i], row[seq[q]].item())
        k = top_ids.shape[1]
        want_lp, want_ids = row.topk(k)
        assert np.allclose(top_lp[i], want_lp.numpy(), atol=TOL), q
        # ties within tolerance may swap places: compare ids through their reference logprobs
        assert np.allclose(row[torch.from_numpy(top_ids[i]).long()].numpy(), want_lp.numpy(), atol=TOL)


def test_generated_and_prompt_logprobs_equal_hf_log_softmax(runner, hf):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 9, 70, 130)]
    echo = dict(logprobs=True, prompt_logprobs=True)
    requests = [
        (prompts[0], SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True, top_logprobs=5)),
        (prompts[1], SamplingParams(max_new_tokens=20, temperature=0.0, logprobs=True)),
        (prompts[2], SamplingParams(max_new_tokens=8, top_logprobs=5, **echo)),
        (prompts[3], SamplingParams(max_new_tokens=5, seed=7, top_logprobs=20, **echo)),
    ]
    plain = [(p, SamplingParams(max_new_tokens=6, temperature=0.0)) for p in prompts]
    # prompts in 37-token chunks: prompt log-probabilities span chunks, next to requests without any
    got = generate_with_logprobs(runner, MAX_LEN, requests[:2] + plain + requests[2:], chunk=37)
    for (prompt, _), result in zip(requests, got[:2] + got[-2:], strict=True):
        check_against_hf(hf, prompt, *result)


def test_penalties_and_temperature_do_not_change_the_reported_logprobs(runner, hf):
    prompt = [5, 9, 11, 11, 40, 12]
    params = SamplingParams(
        max_new_tokens=16, temperature=1.7, seed=1, repetition_penalty=3.0, frequency_penalty=2.0,
        logit_bias=((7, 20.0),), logprobs=True, top_logprobs=3,
    )  # fmt: skip
    ((out, first, chosen, ids, top),) = generate_with_logprobs(runner, MAX_LEN, [(prompt, params)])
    assert 7 in out.tokens  # the bias moved the draw ...
    check_against_hf(hf, prompt, out, first, chosen, ids, top)  # ... not the reported distribution


def test_a_reader_that_falls_behind_holds_its_request_back_without_losing_an_entry(runner, hf):
    """A ring of 8 positions, a 40-token prompt with prompt logprobs and 30 output tokens: the
    engine may run at most 8 positions ahead of what the test has read."""
    h = EngineHarness(runner, max_model_len=MAX_LEN, num_slots=4, logprob_ring=8)
    front = h.frontend
    prompt = list(range(3, 43))
    params = SamplingParams(
        max_new_tokens=30, temperature=0.0, logprobs=True, top_logprobs=2, prompt_logprobs=True
    )
    other = SamplingParams(max_new_tokens=30, temperature=0.0)
    try:
        slot, gen = h.submit(prompt, params)
        free = h.submit(prompt, other)  # a request without log-probabilities is never held
        read, chosen = 1, []
        for _ in range(10_000):
            if h.done((slot, gen)):
                break
            h.engine.step()
            end = front.logprob_end(slot)
            assert end - read <= 8
            if end - read >= 5 or h.done((slot, gen)):  # read in bursts, as a busy loop would
                chosen.extend(front.read_logprobs(slot, read, end, 2)[0].tolist())
                read = end
                front.set_logprob_read(slot, read)
        end = front.logprob_end(slot)
        chosen.extend(front.read_logprobs(slot, read, end, 2)[0].tolist())
        out = front.read_output(slot)
        assert h.done(free) and len(out.tokens) == 30
        seq = prompt + out.tokens
        ref = hf_logprobs(hf, seq)
        assert len(chosen) == len(seq) - 1
        assert np.allclose(chosen, [ref[q - 1, seq[q]].item() for q in range(1, len(seq))], atol=TOL)
    finally:
        h.close()


def test_greedy_output_is_unchanged_by_asking_for_logprobs(runner):
    prompt = [3, 4, 5, 6, 7, 8, 9]
    base = SamplingParams(max_new_tokens=20, temperature=0.0)
    with_lp = dataclasses.replace(base, logprobs=True, top_logprobs=4, prompt_logprobs=True)
    h = EngineHarness(runner, max_model_len=MAX_LEN)
    try:
        a, b = h.step_until_done([h.submit(prompt, base), h.submit(prompt, with_lp)])
        assert a.tokens == b.tokens
    finally:
        h.close()


def test_echo_and_logprobs_on_smollm2_equal_hf(hf_smollm2):
    """The embedded SmolLM2 (what loglikelihood evaluation runs on this server by default): the
    prompt's and the generated tokens' log-probabilities equal HF transformers' log-softmax."""
    from engine_harness import smollm2_prompts
    from lightllm_async.models.loader import default_model_path

    smol = model_runner(default_model_path(), max_model_len=MAX_LEN, kv_cache_tokens=2048)
    prompts = [p for p in smollm2_prompts() if len(p) < MAX_LEN - 16][:2]
    requests = [(p, SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=True, prompt_logprobs=True,
                                   top_logprobs=3)) for p in prompts]  # fmt: skip
    for (prompt, _), result in zip(
        requests, generate_with_logprobs(smol, MAX_LEN, requests, chunk=64), strict=True
    ):
        check_against_hf(hf_smollm2, prompt, *result)
