"""Our model + scheduler + runner against HF transformers' own implementation, greedy, fp32 on the CPU.

SmolLM2 comes from the embedded GGUF; transformers dequantizes it with its own loader, so weights,
config and q/k un-permutation are checked independently of ours. Tiny random folders cover the
variants SmolLM2 lacks: Llama-3 rope scaling and Qwen2's attention biases.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from engine_harness import generate
from transformers import AutoModelForCausalLM

from lightllm_async.config import EngineConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools.make_random_model import shape_config, write_model

NEW_TOKENS = 64


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def smollm2_prompts() -> list[list[int]]:
    tok = load_tokenizer(default_model_path())
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in chats]
    prompts += [tok.encode("The quick brown fox"), tok.encode("def fibonacci(n):\n    ")]
    return prompts


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    runner = ModelRunner(EngineConfig(model_path=path, device="cpu", max_model_len=512,
                                      kv_cache_tokens=8192, max_running_requests=8))
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    return runner, hf.eval()


def test_smollm2_greedy_equals_hf_transformers_batched(smollm2):
    runner, hf = smollm2
    prompts = smollm2_prompts()
    ours = generate(runner, prompts, NEW_TOKENS)  # all five batched together
    for prompt, out in zip(prompts, ours):
        assert len(out) == NEW_TOKENS
        assert out == hf_greedy(hf, prompt, NEW_TOKENS)


def test_chunked_prefill_changes_nothing(smollm2):
    runner, _ = smollm2
    prompts = smollm2_prompts()
    whole = generate(runner, prompts, 16)
    chunked = generate(runner, prompts, 16, max_num_batched_tokens=7)  # prompts split in 7-token chunks
    assert chunked == whole


@pytest.mark.parametrize("variant", ["llama3-rope-scaling", "qwen2-bias"])
def test_tiny_variants_equal_hf_transformers(tmp_path, variant):
    if variant == "llama3-rope-scaling":
        cfg = dataclasses.replace(shape_config("tiny", "float32"), rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        cfg = dataclasses.replace(shape_config("tiny", "float32"), architecture="Qwen2ForCausalLM",
                                  attention_bias=True, tie_word_embeddings=False)
    path = write_model(cfg, str(tmp_path / variant), seed=3)
    runner = ModelRunner(EngineConfig(model_path=path, device="cpu", max_model_len=256,
                                      kv_cache_tokens=2048, max_running_requests=4))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 90)]
    ours = generate(runner, prompts, 24)
    for prompt, out in zip(prompts, ours):
        assert out == hf_greedy(hf, prompt, 24)
