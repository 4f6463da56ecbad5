"""--pd prefill=1,decode=1 on two CUDA GPUs (the KV moves over NCCL): greedy output equals the
unified server's on the same weights, in float32 with CUDA graphs, for a Llama (GQA KV) and a
DeepSeek (MLA latent), streamed with concurrent requests; in bfloat16 at a Llama-3-8B layer shape
the agreement with the unified bf16 server is measured (both read the same bf16 KV: a transfer
moves the bytes, so they must agree exactly). Skipped without 2 GPUs; run by
perf/multi_gpu_check.sh on nvidia-h200-x2."""

from __future__ import annotations

import os
import random

import pytest

from lightllm_async.tools.make_random_model import make_random_model
from serverproc import ServerProcess, concurrently, stream_token_ids
from test_tp_gpu import WORDS, _agreement, llama3_layers, two_gpus  # noqa: F401 - the fixture applies here too

pytestmark = pytest.mark.gpu


def _greedy(path: str, pd: bool, dtype: str, prompts: list[str], n: int, *extra: str) -> list[list[int]]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    srv = ServerProcess(
        "--model", path, *extra, *(("--pd", "prefill=1,decode=1") if pd else ()), "--dtype", dtype,
        "--max-model-len", "512", "--max-running-requests", "16", "--max-num-batched-tokens", "256",
        "--kv-cache-tokens", "16384", env=env, ready_timeout=300,
    )  # fmt: skip
    try:
        alone = [stream_token_ids(srv, p, n) for p in prompts]
        if dtype == "float32":  # in bf16 a batch's GEMM shapes may round differently
            together = concurrently(lambda p: stream_token_ids(srv, p, n), prompts)
            assert together == alone  # batching and transfers in flight change nothing
        log = srv.text_log()
        assert "captured" in log
        if pd:
            assert "KV per token transferred" in log
    except BaseException:
        print(srv.text_log()[-6000:])  # the device run keeps only this output
        raise
    finally:
        assert srv.stop() == 0
    return alone


def _prompts(k: int) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choices(WORDS, k=rng.choice([1, 5, 30, 90]))) for _ in range(k)]


@pytest.mark.parametrize("shape", ["tiny", "deepseek-v2-tiny"])
def test_pd_greedy_equals_the_unified_server_float32_with_graphs(shape, tmp_path):
    path = make_random_model(shape, str(tmp_path), "float32", seed=3)
    prompts = _prompts(6)
    assert _greedy(path, True, "float32", prompts, 24) == _greedy(path, False, "float32", prompts, 24)


def test_pd_bfloat16_llama3_layer_shape_equals_the_unified_server(tmp_path):
    """The decode engine continues from the prefill engine's own bf16 KV: the same numbers the
    unified engine would have in its cache, so greedy tokens agree exactly here too (a different
    batch shape could still flip a near-tie in principle; random weights' flat logits make that
    the thing to watch: the share of agreeing tokens is printed)."""
    prompts, path, rnd = _prompts(8), llama3_layers(tmp_path), ("--load-format", "random")
    pd = _greedy(path, True, "bfloat16", prompts, 32, *rnd)
    one = _greedy(path, False, "bfloat16", prompts, 32, *rnd)
    same = _agreement(pd, one)
    print(f"PD bf16 agreement with the unified server: {same:.3f}")
    assert same >= 0.9
