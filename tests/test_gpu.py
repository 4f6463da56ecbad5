"""On a CUDA device: the server on the GPU equals HF transformers, with and without CUDA graphs.

The weights are random (SmolLM2-135M's shape, written to a temporary folder): nothing is
downloaded. Skipped where there is no GPU; run on the lent GPU by perf/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from engine_harness import hf_greedy
from serverproc import ServerProcess
from test_server import stream_token_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lightllm_async.tools.make_random_model import make_random_model

    return make_random_model(
        "smollm2-135m", str(tmp_path_factory.mktemp("smol")), dtype="float32", seed=5, device="cuda"
    )


@pytest.fixture(scope="module")
def prompts_and_reference(model_dir):
    from transformers import AutoModelForCausalLM

    from lightllm_async.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    texts = [
        "The quick brown fox",
        "def fibonacci(n):",
        "Paris is the capital of",
        tok.apply_chat_template([{"role": "user", "content": "Hello there!"}]),
        tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
        ),
    ]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    out = [(text, hf_greedy(hf, tok.encode(text), NEW_TOKENS)) for text in texts]
    del hf
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_server_greedy_equals_hf_transformers(model_dir, prompts_and_reference, graphs):
    args = [
        "--model",
        model_dir,
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.3",
    ]
    srv = ServerProcess(*args, *([] if graphs else ["--disable-cuda-graph"]))
    try:
        for text, expected in prompts_and_reference:
            assert stream_token_ids(srv, text, NEW_TOKENS) == expected
        assert "captured" in srv.text_log() or not graphs
    finally:
        srv.stop()


def test_bf16_graphs_on_and_off_give_identical_greedy_output(model_dir, prompts_and_reference):
    outs = []
    for extra in ([], ["--disable-cuda-graph"]):
        srv = ServerProcess(
            "--model",
            model_dir,
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--gpu-memory-utilization",
            "0.3",
            *extra,
        )
        try:
            outs.append([stream_token_ids(srv, t, NEW_TOKENS) for t, _ in prompts_and_reference])
        finally:
            srv.stop()
    assert outs[0] == outs[1]
