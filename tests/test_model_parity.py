"""Our model + scheduler + runner against HF transformers' own implementation, greedy, fp32 on the CPU.

SmolLM2 comes from the embedded GGUF; transformers dequantizes it with its own loader, so weights,
config and q/k un-permutation are checked independently of ours. Tiny random folders cover the
variants SmolLM2 lacks: Llama-3 rope scaling and Qwen2's attention biases.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import generate, hf_greedy, model_runner, smollm2_prompts
from lightllm_async.config import EngineConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tools.make_random_model import shape_config, write_model

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2(hf_smollm2):
    runner = ModelRunner(
        EngineConfig(
            model_path=default_model_path(),
            device="cpu",
            quantization="none",  # the float32 reference (auto keeps the GGUF's 4-bit weights packed)
            max_model_len=512,
            kv_cache_tokens=8192,
            max_running_requests=8,
        )
    )
    return runner, hf_smollm2


def test_smollm2_greedy_equals_hf_transformers_batched(smollm2, smollm2_reference):
    runner, _ = smollm2
    prompts = [p for p, _ in smollm2_reference]
    ours = generate(runner, prompts, NEW_TOKENS)  # all five batched together
    for (_, expected), out in zip(smollm2_reference, ours, strict=True):
        assert len(expected) == NEW_TOKENS
        assert out == expected


def test_chunked_prefill_changes_nothing(smollm2):
    runner, _ = smollm2
    prompts = smollm2_prompts()
    whole = generate(runner, prompts, 16)
    chunked = generate(runner, prompts, 16, max_num_batched_tokens=7)  # prompts split in 7-token chunks
    assert chunked == whole


@pytest.mark.parametrize("variant", ["llama3-rope-scaling", "linear-rope-scaling", "qwen2-bias"])
def test_tiny_variants_equal_hf_transformers(tmp_path, variant):
    if variant == "linear-rope-scaling":
        cfg = dataclasses.replace(
            shape_config("tiny", "float32"), rope_scaling={"rope_type": "linear", "factor": 4.0}
        )
    elif variant == "llama3-rope-scaling":
        cfg = dataclasses.replace(
            shape_config("tiny", "float32"),
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    else:
        cfg = dataclasses.replace(
            shape_config("tiny", "float32"),
            architecture="Qwen2ForCausalLM",
            attention_bias=True,
            tie_word_embeddings=False,
        )
    path = write_model(cfg, str(tmp_path / variant), seed=3)
    runner = ModelRunner(
        EngineConfig(
            model_path=path, device="cpu", max_model_len=256, kv_cache_tokens=2048, max_running_requests=4
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 90)]
    ours = generate(runner, prompts, 24)
    for prompt, out in zip(prompts, ours, strict=True):
        assert out == hf_greedy(hf, prompt, 24)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, bias", [(64, False), (80, True), (96, False)])
def test_cuda_model_equals_hf_transformers_at_any_head_dim(gpu, tmp_path, head_dim, bias):
    """The compiled kernels end to end (CUDA graphs included), at head dims padded to a power of two."""
    cfg = dataclasses.replace(
        shape_config("tiny", "float32"),
        architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM",
        attention_bias=bias,
        num_heads=8,  # transformers wants hidden_size (64) a multiple of it
        num_kv_heads=2,
        head_dim=head_dim,
    )
    path = write_model(cfg, str(tmp_path), seed=4, device="cuda")
    runner = model_runner(path, "cuda", kv_cache_tokens=2048, max_running_requests=4)  # float32, as HF
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 13, 90)]
    for prompt, out in zip(prompts, generate(runner, prompts, 24), strict=True):
        assert out == hf_greedy(hf, prompt, 24)
