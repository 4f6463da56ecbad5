"""A real model served at `--tp 2` on the CPU (two engine processes over gloo): greedy output
equals HF transformers' (and so TP=1's), concurrent requests with chunked prefill equal the same
requests alone, and a seeded sampled request gives the same tokens at TP=2 as at TP=1.
Llama (GQA, heads split 2 ways) and DeepSeek (MLA heads split, latent replicated, experts'
intermediate dimension split)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import hf_greedy
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools.make_random_model import make_random_model
from serverproc import ServerProcess, completion_text, concurrently, random_completions, stream_token_ids

WORDS = ("the", "model", "token", "stream", "cache", "expert", "router", "latent", "query", "brown", "fox")
NEW_TOKENS = 16


def _server(path: str, tp: int) -> ServerProcess:
    return ServerProcess(
        "--model", path, "--device", "cpu", "--tp", str(tp), "--max-model-len", "512",
        "--max-running-requests", "8", "--num-slots", "24", "--max-num-batched-tokens", "32",
        "--cpu-threads", "1",
    )  # fmt: skip


@pytest.fixture(scope="module", params=["tiny", "deepseek-v3-tiny", "deepseek-v2-tiny"])
def tp2(request, tmp_path_factory):
    path = make_random_model(request.param, str(tmp_path_factory.mktemp(request.param)), "float32", seed=4)
    srv = _server(path, 2)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield srv, hf, load_tokenizer(path), path
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()


def test_greedy_at_tp2_equals_hf_transformers(tp2):
    srv, hf, tok, _ = tp2
    rng = random.Random(5)
    for n_words in (1, 6, 60):  # 60 words: a prompt prefilled in several 32-token chunks
        text = " ".join(rng.choices(WORDS, k=n_words))
        assert stream_token_ids(srv, text, NEW_TOKENS) == hf_greedy(hf, tok.encode(text), NEW_TOKENS)


def test_concurrent_requests_at_tp2_each_equal_the_request_alone(tp2):
    srv, *_ = tp2
    bodies = random_completions(WORDS, 10, 8, 3)
    alone = [completion_text(srv, b) for b in bodies]
    assert concurrently(lambda b: completion_text(srv, b), bodies) == alone


def test_seeded_sampling_at_tp2_equals_tp1(tp2):
    srv, _, _, path = tp2
    body = {"prompt": "the brown fox", "max_tokens": 12, "temperature": 1.3, "top_p": 0.95, "seed": 77,
            "ignore_eos": True, "presence_penalty": 0.5, "logprobs": 2}  # fmt: skip
    status, _, at2 = srv.request("POST", "/v1/completions", body)
    assert status == 200, at2
    one = _server(path, 1)
    try:
        status, _, at1 = one.request("POST", "/v1/completions", body)
    finally:
        assert one.stop() == 0
    assert at2["choices"][0]["text"] == at1["choices"][0]["text"]
    lp2, lp1 = at2["choices"][0]["logprobs"], at1["choices"][0]["logprobs"]
    assert lp2["tokens"] == lp1["tokens"]
    assert lp2["token_logprobs"] == pytest.approx(lp1["token_logprobs"], abs=1e-4)
