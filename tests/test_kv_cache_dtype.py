"""--kv-cache-dtype fp8: what the CLI and the runner accept and refuse (the kernels' float8 reads
and stores are tested in tests/test_kernels_attention.py, in the interpreter and on CUDA)."""

import pytest
import torch

from lightllm_async.models.deepseek import MLAKVCache
from lightllm_async.models.llama import KVCache
from lightllm_async.models.loader import load_model_config
from lightllm_async.runner.model_runner import resolve_kv_dtype
from lightllm_async.server import build_parser, resolve_config
from lightllm_async.tools.make_random_model import shape_config, write_model


def resolve(*flags):
    return resolve_config(build_parser().parse_args(["--model", "dummy", *flags]))


def test_the_flag_reaches_the_engine_and_is_refused_where_it_cannot_run():
    assert resolve().engine.kv_cache_dtype == "auto"
    assert resolve("--kv-cache-dtype", "fp8").engine.kv_cache_dtype == "fp8"
    assert resolve("--kv-cache-dtype", "fp8_e4m3").engine.kv_cache_dtype == "fp8"  # vLLM's other name
    for flags in (["--device", "cpu"], ["--pd", "prefill=1,decode=1"], ["--role", "decode"]):
        with pytest.raises(SystemExit, match="kv-cache-dtype fp8"):
            resolve("--kv-cache-dtype", "fp8", *flags)
    with pytest.raises(SystemExit):
        resolve("--kv-cache-dtype", "int8")


def test_the_runner_takes_float8_e4m3_for_llama_on_cuda_only():
    bf16 = torch.bfloat16
    assert resolve_kv_dtype("auto", bf16, torch.device("cpu"), KVCache) is bf16
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_kv_dtype("fp8", bf16, torch.device("cpu"), KVCache)
    with pytest.raises(ValueError, match="must be auto or fp8"):
        resolve_kv_dtype("e5m2", bf16, torch.device("cpu"), KVCache)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        assert resolve_kv_dtype("fp8", bf16, torch.device("cuda"), KVCache) == torch.float8_e4m3fn
        with pytest.raises(ValueError, match="MLA"):
            resolve_kv_dtype("fp8", bf16, torch.device("cuda"), MLAKVCache)


def test_a_float8_cache_is_half_the_bytes_so_twice_the_tokens(tmp_path):
    cfg = load_model_config(write_model(shape_config("tiny", "float32"), str(tmp_path), seed=1))
    fp8 = KVCache.bytes_per_token(cfg, torch.float8_e4m3fn)
    assert 2 * fp8 == KVCache.bytes_per_token(cfg, torch.bfloat16)
    kv = KVCache.allocate(cfg, 9, torch.float8_e4m3fn, "cpu")
    assert all(t.dtype == torch.float8_e4m3fn and t.shape[0] == 9 for t in kv.layers())
