"""The switch between Triton kernels and PyTorch references, and the package without triton."""

import os
import subprocess
import sys

import torch

import lightllm_async
from lightllm_async.kernels import backend


def test_ref_mode_routes_everything_to_the_references(monkeypatch):
    monkeypatch.setenv("LLA_KERNELS", "ref")
    assert not backend.use_triton(torch.zeros(1))


def test_cpu_tensors_use_triton_only_when_asked_for_in_the_interpreter(monkeypatch):
    monkeypatch.delenv("LLA_KERNELS", raising=False)
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("LLA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(torch.zeros(1)) == (backend.HAS_TRITON and backend.INTERPRETED)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.use_triton(torch.zeros(1))


def test_package_imports_and_runs_references_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from lightllm_async.kernels import backend, decode_attention, rms_norm, rope_cache, rotary_emb
assert not backend.HAS_TRITON and not backend.use_triton(torch.zeros(1))
x = torch.randn(3, 8)
assert rms_norm(x, torch.ones(8), 1e-6).shape == (3, 8)
q, k = rotary_emb(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.arange(3), rope_cache(8, 4, 1e4, None))
print("ok")
"""
    src = os.path.dirname(os.path.dirname(lightllm_async.__file__))
    env = os.environ | {"PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
