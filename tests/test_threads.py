"""The engine's CPU thread policy (issue 12): idle OpenMP workers sleep rather than spin, and the
engine leaves a core to the frontend unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightllm_async.engine.process import cpu_threads
from lightllm_async.server import build_parser, resolve_config

CHILD = """
import os, sys
from lightllm_async.config import EngineConfig
from lightllm_async.engine.process import configure_threads
assert "torch" not in sys.modules
threads = configure_threads(EngineConfig(model_path="some-model", cpu_threads=int(sys.argv[1])))
import torch
print(threads, torch.get_num_threads(), os.environ["OMP_WAIT_POLICY"])
"""


def _child(requested: int, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(requested)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()


def test_default_leaves_one_core_to_the_frontend():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0) == max(1, cores - 1)
    assert cpu_threads(3) == 3


def test_engine_threads_are_set_and_do_not_spin_before_torch_loads():
    expected = str(max(1, len(os.sched_getaffinity(0)) - 1))
    assert _child(0) == [expected, expected, "PASSIVE"]
    assert _child(3) == ["3", "3", "PASSIVE"]


def test_a_wait_policy_the_user_set_is_kept():
    assert _child(1, OMP_WAIT_POLICY="ACTIVE")[2] == "ACTIVE"


def test_cpu_threads_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["--model", "dummy", "--cpu-threads", "3"])
    assert resolve_config(args).engine.cpu_threads == 3
    assert resolve_config(build_parser().parse_args(["--model", "dummy"])).engine.cpu_threads == 0


TRITON_CHILD = """
import sys
from lightllm_async.config import EngineConfig
from lightllm_async.engine.process import configure_threads
configure_threads(EngineConfig(model_path="some-model", device="cpu", cpu_compile=sys.argv[1] == "compile"))
from lightllm_async.kernels import backend
import torch
from lightllm_async.layers.quantized import Int4Linear  # the CPU path's layers import without it
print(backend.HAS_TRITON, backend.use_triton(torch.zeros(1)))
"""


def test_a_cpu_engine_leaves_triton_out_but_for_cpu_compile():
    """Importing triton is ~0.25 s of a CPU engine's start, for kernels it never runs there."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "LLA_KERNELS"}

    def child(*args: str, **extra: str) -> list[str]:
        cmd = [sys.executable, "-c", TRITON_CHILD, *args]
        kw = dict(capture_output=True, text=True, timeout=120, check=True)
        out = subprocess.run(cmd, env={**env, **extra}, **kw)
        return out.stdout.split()

    assert child("eager") == ["False", "False"]
    assert child("compile") == ["True", "False"]  # inductor looks for triton
    assert child("eager", LLA_KERNELS="triton")[0] == "True"  # the interpreter asked for
