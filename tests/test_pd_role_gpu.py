"""--role prefill|decode|router on two CUDA GPUs: the prefill server on GPU 0, the decode server on
GPU 1, their engines moving KV over NCCL, and a router: greedy output through the router equals a
unified one-GPU server's, in float32 with CUDA graphs, for a Llama (GQA) and a DeepSeek (MLA),
alone and concurrent; a decode server killed mid-stream ends the router's requests with an error
within 2 s and /health answers 503.

A role server runs one engine on "cuda", its process's current device, so each server is given
its GPU through CUDA_VISIBLE_DEVICES (NCCL reaches a peer GPU its process cannot see). The servers
and streams are test_pd_role.py's helpers, which CI runs on the CPU; LLA_PD_ROLE_GPU_ON_CPU=1 runs
this file there too, over gloo (a dry run of its own logic). Skipped without 2 GPUs; run with
`pytest -m gpu tests/test_pd_role_gpu.py` on nvidia-h200-x2."""

from __future__ import annotations

import os
import random

import pytest
import torch

from lightllm_async.tools.make_random_model import make_random_model
from serverproc import ServerProcess, concurrently, free_port, stream_token_ids, wait_until
from test_pd_role import WORDS, _kill_mid_stream, _pair, _router, _shm_files, _stop_all

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("LLA_PD_ROLE_GPU_ON_CPU") == "1"


@pytest.fixture(autouse=True)
def two_gpus():
    if not ON_CPU and (torch.cuda.device_count() < 2 or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs two CUDA devices")


def _gpus() -> tuple[str, str]:
    """The first two GPUs this test may use, as CUDA_VISIBLE_DEVICES names them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [v.strip() for v in visible.split(",")] if visible else ["0", "1"]
    return ids[0], ids[1]


def _setup(max_len: int) -> tuple[tuple[str, ...], tuple[dict, dict]]:
    """The role servers' device and limits, and each one's environment (prefill, decode)."""
    limits = ("--dtype", "float32", "--max-model-len", str(max_len), "--max-running-requests", "8",
              "--num-slots", "24")  # fmt: skip
    if ON_CPU:
        return ("--device", "cpu", "--cpu-threads", "1", *limits), ({}, {})
    envs = tuple({"CUDA_VISIBLE_DEVICES": g, "NCCL_NVLS_ENABLE": "0"} for g in _gpus())
    return ("--device", "cuda", "--kv-cache-tokens", "16384", *limits), envs


def _started(path: str, max_len: int, chunk: int) -> list[ServerProcess]:
    """(router, prefill server, decode server), the router answering 200."""
    common, envs = _setup(max_len)
    ports = (free_port(), free_port())
    p, d = _pair(path, ports, chunk, common, envs, ready_timeout=300)
    router = _router(path, ports, max_len=max_len)
    assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
    backend = "gloo" if ON_CPU else "nccl"
    for s in (p, d):
        assert f"joined ({backend})" in s.text_log(), s.text_log()[-3000:]
    if not ON_CPU:
        assert "captured" in d.text_log()  # the decode engine replays CUDA graphs
    return [router, p, d]


def _printing_logs(servers: list[ServerProcess]):
    """On failure, the servers' log tails (the device run keeps only this output)."""
    for s in servers:
        print(f"---- {s.proc.args[5:9]} ----\n{s.text_log()[-4000:]}")


@pytest.mark.parametrize("shape", ["tiny", "deepseek-v2-tiny"])
def test_role_servers_on_two_gpus_greedy_through_the_router_equals_a_unified_server(shape, tmp_path):
    path = make_random_model(shape, str(tmp_path), "float32", seed=3)
    rng = random.Random(7)
    prompts = [" ".join(rng.choices(WORDS, k=rng.choice([1, 5, 30, 90]))) for _ in range(6)]
    common, envs = _setup(512)
    unified = ServerProcess(
        "--model", path, *common, "--max-num-batched-tokens", "32", env=envs[0], ready_timeout=300
    )  # fmt: skip
    try:
        want = [stream_token_ids(unified, p, 24) for p in prompts]
    finally:
        assert unified.stop() == 0
    servers = _started(path, 512, 32)
    try:
        router = servers[0]
        assert [stream_token_ids(router, p, 24) for p in prompts] == want
        assert concurrently(lambda p: stream_token_ids(router, p, 24), prompts) == want
    except BaseException:
        _printing_logs(servers)
        raise
    finally:
        _stop_all(*servers)
    assert [s.proc.returncode for s in servers] == [0, 0, 0]


def test_role_servers_on_two_gpus_a_killed_decode_server_ends_the_routers_requests_within_2s(tmp_path):
    """Decoding streams long enough (1800 tokens) to outlast the prompts' start on a GPU."""
    path = make_random_model("tiny", str(tmp_path), "float32", seed=4)
    servers = _started(path, 2048, 8)  # small chunks: prompts take many steps
    try:
        _kill_mid_stream(*servers, "decode", decode_tokens=1800)
    except BaseException:
        _printing_logs(servers)
        raise
    finally:
        _stop_all(*servers)
    assert _shm_files(servers[1]) == []
