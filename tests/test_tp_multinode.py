"""Two "nodes" on one host (separate process trees, CPU, gloo): node 0 serves HTTP with TP rank 0,
node 1 runs rank 1 only, step records broadcast between them. Greedy output equals HF
transformers'; node 1's death ends node 0 like a local rank's, mid-stream or idle; node 0's stop
ends node 1 cleanly."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import hf_greedy
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools.make_random_model import make_random_model
from serverproc import ServerProcess, free_port, stream_token_ids
from test_lifecycle import region_files

FLAGS = ("--device", "cpu", "--max-model-len", "512", "--max-running-requests", "8", "--num-slots", "16",
         "--max-num-batched-tokens", "32", "--cpu-threads", "1", "--tp", "2", "--nnodes", "2")  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_random_model("tiny", str(tmp_path_factory.mktemp("tiny")), "float32", seed=6)


def _nodes(model: str):
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    node1 = subprocess.Popen(
        [sys.executable, "-m", "lightllm_async.server", "--model", model, *FLAGS, "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", port],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        node0 = ServerProcess("--model", model, *FLAGS, "--node-rank", "0", "--master-port", port)
    except BaseException:
        node1.kill()
        raise
    return node0, node1


def test_two_nodes_greedy_equals_hf_and_node0s_stop_ends_node1(model):
    node0, node1 = _nodes(model)
    try:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        tok = load_tokenizer(model)
        for text in ("the", "a stream of tokens " * 6):
            try:
                ids = stream_token_ids(node0, text, 12)
            except TimeoutError:  # seen once in a full local run (2026-11-30): say where each node was
                node1.kill()
                tail = node1.stdout.read().decode(errors="replace")[-4000:]
                raise AssertionError(
                    f"no answer:\nnode 0:\n{node0.text_log()[-4000:]}\nnode 1:\n{tail}"
                ) from None
            assert ids == hf_greedy(hf, tok.encode(text), 12)
        assert node0.stop() == 0
        code = node1.wait(20)
        assert code == 0, node1.stdout.read().decode(errors="replace")[-4000:]
    finally:
        node1.kill()
        if node0.proc.poll() is None:
            node0.kill_tree()


def test_node1_killed_mid_stream_ends_node0_with_errors(model):
    node0, node1 = _nodes(model)
    results: list = []

    def streamer():
        results.append(node0.stream("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True,
                                                        "ignore_eos": True}))  # fmt: skip

    try:
        threads = [threading.Thread(target=streamer) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        node1.send_signal(signal.SIGKILL)  # its ranks die with it (PDEATHSIG)
        for t in threads:
            t.join(30)
        for events in results:
            assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert _exit_code(node0, 20) == 1, node0.text_log()[-6000:]
        assert region_files(node0) == []
    finally:
        node1.kill()
        if node0.proc.poll() is None:
            node0.kill_tree()


def test_node1_killed_while_idle_ends_node0(model):
    """An idle rank 0 runs no collective, so only its keepalives can notice the peer host gone."""
    node0, node1 = _nodes(model)
    try:
        assert node0.request("GET", "/health")[0] == 200
        node1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert _exit_code(node0, 20) == 1, node0.text_log()[-6000:]
        assert time.monotonic() - t0 < 10, node0.text_log()[-6000:]
        assert region_files(node0) == []
    finally:
        node1.kill()
        if node0.proc.poll() is None:
            node0.kill_tree()


def test_node1_frozen_mid_stream_ends_node0_with_errors(model):
    """A host that vanishes closes no socket (power, network): every process of node 1 stopped.
    The ranks' heartbeats in the rendezvous store notice it, where the step broadcast and the
    all-reduces would wait on forever: node 0's streams end with an error and it exits 1."""
    node0, node1 = _nodes(model)
    results: list = []

    def streamer():
        results.append(node0.stream("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True,
                                                        "ignore_eos": True}))  # fmt: skip

    tree = [node1.pid]
    try:
        threads = [threading.Thread(target=streamer) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        tree += [int(c) for path in glob.glob(f"/proc/{node1.pid}/task/*/children")
                 for c in Path(path).read_text().split()]  # fmt: skip
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for t in threads:
            t.join(30)
        for events in results:
            assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert _exit_code(node0, 30) == 1, node0.text_log()[-6000:]
        assert time.monotonic() - t0 < 15, node0.text_log()[-6000:]
        assert "TP group rank 1 stopped beating" in node0.text_log()
        assert region_files(node0) == []
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node1.kill()
        if node0.proc.poll() is None:
            node0.kill_tree()


def _exit_code(node0: ServerProcess, timeout: float) -> int:
    """Node 0's exit code; a failure that shows its log and where its processes wait (py-spy)
    when it is still running after `timeout` seconds."""
    try:
        return node0.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"node 0 runs on after {timeout} s:\n{node0.text_log()[-6000:]}\n{_stacks(node0.proc.pid)}"
        )


def _stacks(pid: int) -> str:
    if shutil.which("py-spy") is None:
        return "(no py-spy: no stacks)"
    children = glob.glob(f"/proc/{pid}/task/*/children")
    pids = [pid, *(int(c) for path in children for c in Path(path).read_text().split())]
    dumps = [
        subprocess.run(["py-spy", "dump", "--pid", str(p)], capture_output=True, text=True) for p in pids
    ]
    return "\n".join(d.stdout + d.stderr for d in dumps)
