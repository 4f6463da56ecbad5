"""A tiny random DeepSeek served for real: HTTP -> shared memory -> engine process -> back, fp32
on the CPU, against HF transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on the same
weights. V3 has q_lora_rank and noaux_tc grouped routing; V2 has no q_lora_rank, YaRN and greedy
routing. Steps of at most 32 tokens make long prompts prefill in chunks in the same steps as other
requests' decodes (MLA's decompressed path); decode-only steps take the absorbed path.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import hf_greedy
from lightllm_async.models.loader import load_model_config
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools.make_random_model import make_random_model
from serverproc import (
    ServerProcess,
    check_disconnect_frees_slot_and_kv,
    concurrently,
    stream_text,
    stream_token_ids,
)

NEW_TOKENS = 20
MAX_RUNNING = 8
WORDS = ("the", "model", "token", "stream", "cache", "expert", "router", "latent", "query", "brown", "fox")


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=n_words))


@pytest.fixture(scope="module", params=["deepseek-v3-tiny", "deepseek-v2-tiny"])
def deepseek(request, tmp_path_factory):
    """(server, HF model, tokenizer, max_model_len) for one random checkpoint."""
    path = make_random_model(request.param, str(tmp_path_factory.mktemp(request.param)), "float32", seed=9)
    max_model_len = load_model_config(path).max_position_embeddings  # 2048 (V3), 512 (V2)
    srv = ServerProcess(
        "--model", path,
        "--device", "cpu",
        "--max-model-len", str(max_model_len),
        "--max-running-requests", str(MAX_RUNNING),
        "--num-slots", "24",
        "--max-num-batched-tokens", "32",
    )  # fmt: skip
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield srv, hf, load_tokenizer(path), max_model_len
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()


def test_streamed_greedy_equals_whole_response_and_hf_transformers(deepseek):
    srv, hf, tok, _ = deepseek
    rng = random.Random(3)
    chat = [{"role": "user", "content": _sentence(rng, 9)}]
    prompts = [_sentence(rng, 1), _sentence(rng, 7), _sentence(rng, 45), tok.apply_chat_template(chat)]
    for text in prompts:
        expected = hf_greedy(hf, tok.encode(text), NEW_TOKENS)
        assert stream_token_ids(srv, text, NEW_TOKENS) == expected
        body = {"prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        status, _, whole = srv.request("POST", "/v1/completions", body)
        assert status == 200 and whole["usage"]["completion_tokens"] == NEW_TOKENS
        assert stream_text(srv, body) == whole["choices"][0]["text"] == tok.decode(expected)


def test_chat_completion_is_the_templated_prompt_continued(deepseek):
    srv, hf, tok, _ = deepseek
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected = hf_greedy(hf, tok.encode(tok.apply_chat_template(messages)), 12)
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, _, resp = srv.request("POST", "/v1/chat/completions", body)
    assert status == 200, resp
    assert resp["choices"][0]["message"]["content"] == tok.decode(expected)


def test_concurrent_requests_each_equal_the_same_request_alone(deepseek):
    srv, *_ = deepseek
    rng = random.Random(11)
    bodies = [
        {
            "prompt": _sentence(rng, rng.choice([1, 2, 5, 13, 30, 77, 120])),
            "max_tokens": rng.randint(3, 30),
            "temperature": 0,
            "ignore_eos": True,
        }
        for _ in range(2 * MAX_RUNNING + 3)  # more than run at once: some wait for a place
    ]
    together = concurrently(lambda b: stream_text(srv, b), bodies)
    alone = [stream_text(srv, b) for b in bodies]
    assert together == alone


def test_disconnect_mid_stream_frees_slot_and_kv_tokens(deepseek):
    srv, _, _, max_model_len = deepseek
    total = srv.request("GET", "/metrics")[2]
    assert f"lightllm_async:kv_cache_tokens_total {float(MAX_RUNNING * max_model_len)}" in total
    body = {"prompt": "tell me a long story", "max_tokens": max_model_len - 16, "ignore_eos": True}
    check_disconnect_frees_slot_and_kv(srv, body)
