"""`--cpu-compile`: the CPU decode step compiled by torch.compile gives the eager step's tokens,
and the CLI passes the flag. (Compiling takes a while on a small machine: one tiny model.)"""

from __future__ import annotations

import pytest
import torch

from engine_harness import generate
from lightllm_async.config import EngineConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.server import build_parser, resolve_config
from lightllm_async.tools.make_random_model import shape_config, write_model


def test_the_cli_passes_cpu_compile_to_the_engine():
    def engine(*flags):
        return resolve_config(build_parser().parse_args(["--model", "dummy", *flags])).engine

    assert engine().cpu_compile is False
    assert engine("--cpu-compile").cpu_compile is True


def test_the_compiled_cpu_decode_step_gives_the_eager_tokens(tmp_path):
    """Greedy, float32, batched prompts of unequal lengths (padded contexts, masked) and one
    alone (batch 1): every token the same, and the compiled path really ran."""
    pytest.importorskip("torch._inductor")
    path = write_model(shape_config("tiny", "float32"), str(tmp_path / "tiny"), seed=5)

    def runner(compiled: bool) -> ModelRunner:
        return ModelRunner(
            EngineConfig(
                model_path=path, device="cpu", max_model_len=128, kv_cache_tokens=1024,
                max_running_requests=4, cpu_compile=compiled,
            )
        )  # fmt: skip

    eager, compiled = runner(False), runner(True)
    assert compiled.cpu_decode.compiled and not eager.cpu_decode.compiled
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 9, 40)]
    calls = []
    hidden = compiled.cpu_decode.hidden
    compiled.cpu_decode.hidden = lambda *a: calls.append(1) or hidden(*a)
    assert generate(compiled, prompts, 16) == generate(eager, prompts, 16)
    assert generate(compiled, prompts[1:2], 16) == generate(eager, prompts[1:2], 16)
    assert len(calls) >= 2 * 15
