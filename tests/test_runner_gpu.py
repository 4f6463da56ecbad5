"""On a CUDA device, the runner alone (no server): CUDA-graph replays read the step's one upload,
padding included, under overlapped launch/collect; seeded noise is the same bits as on the CPU.

Skipped where there is no GPU. Needs only torch, triton, safetensors and tokenizers.
"""

from __future__ import annotations

import pytest
import torch

from engine_harness import overlapped_generate
from lightllm_async.config import EngineConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.runner.sampler import SamplingMetadata, sample, seeded_uniform
from lightllm_async.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lightllm_async.tools.make_random_model import shape_config, write_model

    return write_model(shape_config("tiny", "float32"), str(tmp_path_factory.mktemp("tiny")), seed=5)


def test_graphs_on_and_off_give_the_same_tokens_under_overlap(model_dir):
    g = torch.Generator().manual_seed(1)
    # 11 requests over 6 rows: decode batches of every size 1..6, so buckets 1, 2, 4, 6 with and
    # without padding, rows reused as requests finish at different lengths.
    prompts = [
        torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 4, 9, 17, 2, 33, 5, 8, 3, 21, 12)
    ]
    params = [
        SamplingParams(
            max_new_tokens=6 + 5 * (i % 4), temperature=0.0 if i % 3 else 0.8, seed=i if i % 3 == 0 else None
        )
        for i in range(len(prompts))
    ]
    outs = []
    for disable in (False, True):
        cfg = EngineConfig(
            model_path=model_dir,
            device="cuda",
            dtype="float32",
            max_model_len=128,
            kv_cache_tokens=2048,
            max_running_requests=6,
            disable_cuda_graph=disable,
        )
        runner = ModelRunner(cfg)
        assert (runner.graphs is None) == disable
        outs.append(overlapped_generate(runner, prompts, params))
    assert outs[0] == outs[1]
    assert [len(o) for o in outs[0]] == [p.max_new_tokens for p in params]


def test_seeded_noise_has_the_same_bits_on_cuda_and_cpu():
    seed = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 12345], dtype=torch.int64)
    position = torch.tensor([0, 7, 3, 100000, 1, 2], dtype=torch.int64)
    cpu = seeded_uniform(seed, position, 50257)
    gpu = seeded_uniform(seed.cuda(), position.cuda(), 50257)
    assert torch.equal(cpu, gpu.cpu())


def test_seeded_tokens_on_cuda_equal_the_cpu():
    logits = torch.randn(16, 4099) * 2
    params = [
        SamplingParams(temperature=0.7, top_k=i % 5 * 20, top_p=0.5 + i / 40, seed=1000 + i)
        for i in range(16)
    ]
    positions = list(range(16))
    cpu = sample(logits, SamplingMetadata.build(params, positions))
    gpu = sample(logits.cuda(), SamplingMetadata.build(params, positions, device="cuda"))
    assert cpu.tolist() == gpu.tolist()


def test_penalties_bias_and_logprobs_the_same_with_graphs_on_and_off_and_equal_to_hf(model_dir):
    """Every sampling parameter of issue 11 through the CUDA-graph decode path and the eager one:
    the same tokens and log-probabilities; and the log-probabilities are HF's on the GPU."""
    from transformers import AutoModelForCausalLM

    from engine_harness import generate_with_logprobs

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 7, 40, 90, 13)]
    params = [
        SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.5, logprobs=True,
                       top_logprobs=5),
        SamplingParams(max_new_tokens=16, seed=3, frequency_penalty=1.0, presence_penalty=0.5,
                       logit_bias=((11, 3.0), (12, -100.0)), logprobs=True),
        SamplingParams(max_new_tokens=12, seed=4, min_tokens=12, stop_ids=(2, 5), logprobs=True,
                       top_logprobs=20, prompt_logprobs=True),
        SamplingParams(max_new_tokens=18, temperature=0.9, top_k=40, min_p=0.05, seed=9),
        SamplingParams(max_new_tokens=9, temperature=0.0),
    ]  # fmt: skip
    results = []
    for disable in (False, True):
        cfg = EngineConfig(
            model_path=model_dir, device="cuda", dtype="float32", max_model_len=128,
            kv_cache_tokens=2048, max_running_requests=6, disable_cuda_graph=disable,
        )  # fmt: skip
        runner = ModelRunner(cfg)
        assert (runner.graphs is None) == disable
        results.append(generate_with_logprobs(runner, 128, list(zip(prompts, params, strict=True)), chunk=32))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    for graphs, eager, prompt in zip(*results, prompts, strict=True):
        if graphs is None:
            continue
        assert graphs[0].tokens == eager[0].tokens
        for a, b in zip(graphs[2:], eager[2:], strict=True):
            assert torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-4)
        out, first, chosen = graphs[0], graphs[1], graphs[2]
        seq = prompt + out.tokens
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([seq], device="cuda")).logits[0].float(), -1).cpu()
        want = [ref[q - 1, seq[q]].item() for q in range(first, len(seq))]
        assert torch.allclose(torch.as_tensor(chosen), torch.tensor(want), atol=2e-3)


@pytest.mark.parametrize("shape", ["tiny", "deepseek-v2-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("buckets", [None, [8, 24, 40, 64]])
def test_piecewise_graphs_give_the_eager_tokens(shape, buckets, tmp_path):
    """Steps with prefill chunks (chunked prompts beside decodes, 64-token budget) replayed from
    piecewise graphs, at the default buckets (one, 64) and at irregular ones (padding in most
    steps): the tokens of the eager runner, under overlapped launch/collect."""
    from lightllm_async.runner.piecewise import PiecewiseGraphs
    from lightllm_async.tools.make_random_model import shape_config, write_model

    path = write_model(shape_config(shape, "float32"), str(tmp_path), seed=3)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (70, 5, 33, 12, 1, 50, 9, 27, 3)]
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 4), temperature=0.0) for i in range(len(prompts))]
    outs = []
    for eager in (False, True):
        cfg = EngineConfig(
            model_path=path, device="cuda", dtype="float32", max_model_len=128, kv_cache_tokens=1024,
            max_running_requests=5, max_num_batched_tokens=64, disable_cuda_graph=eager,
            disable_piecewise_graph=buckets is not None,
        )  # fmt: skip
        runner = ModelRunner(cfg)
        if not eager and buckets is not None:
            runner.piecewise = PiecewiseGraphs(
                runner.model, runner.kv, runner.inputs, 64, runner.graphs.pool, buckets
            )
            runner.piecewise.capture()
        assert (runner.piecewise is None) == eager
        replays: list[int] = []
        if not eager:

            def counted(bucket, ctx, replay=runner.piecewise.replay, replays=replays):
                replays.append(bucket)
                return replay(bucket, ctx)

            runner.piecewise.replay = counted
        outs.append(overlapped_generate(runner, prompts, params))
        assert eager or len(replays) > 3
    assert outs[0] == outs[1]


@pytest.mark.parametrize("shape", ["tiny", "deepseek-v2-tiny"])
def test_serving_compiles_no_triton_kernel_after_capture(shape, tmp_path):
    """Once the runner has captured its graphs, the steps of a served mix (chunked prompts beside
    decodes, one to five requests a step, the decodes' arrays sliced off the chunks') launch only
    kernels already compiled: a compile in mid-serving stalls every stream for 0.1-1 s."""
    from lightllm_async.kernels.backend import on_compile
    from lightllm_async.tools.make_random_model import shape_config, write_model

    path = write_model(shape_config(shape, "bfloat16"), str(tmp_path), seed=3)
    cfg = EngineConfig(
        model_path=path, device="cuda", dtype="bfloat16", max_model_len=256, kv_cache_tokens=2048,
        max_running_requests=5, max_num_batched_tokens=128,
    )  # fmt: skip
    runner = ModelRunner(cfg)
    assert runner.piecewise is not None
    g = torch.Generator().manual_seed(11)
    lengths = (170, 5, 33, 12, 1, 50, 9, 27, 3, 140, 16, 64)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_new_tokens=3 + 4 * (i % 3), temperature=0.0) for i in range(len(prompts))]
    compiled: list[str] = []
    if not on_compile(compiled.append):
        pytest.skip("this Triton has no compile hook")
    try:
        overlapped_generate(runner, prompts, params)
    finally:
        on_compile(None)
    assert compiled == []


def test_an_fp8_kv_cache_replays_as_it_runs_eagerly(model_dir):
    """--kv-cache-dtype fp8 through the runner on CUDA (bfloat16 model): float8 pools, and the same
    tokens with CUDA graphs (decode and piecewise) as without, under overlap."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 conversions need compute capability 8.9+")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 9, 33, 70, 5)]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0) for _ in prompts]
    outs = []
    for disable in (False, True):
        cfg = EngineConfig(
            model_path=model_dir, device="cuda", dtype="bfloat16", max_model_len=128, kv_cache_tokens=2048,
            max_running_requests=4, disable_cuda_graph=disable, disable_piecewise_graph=disable,
            kv_cache_dtype="fp8",
        )  # fmt: skip
        runner = ModelRunner(cfg)
        assert runner.kv.k[0].dtype == torch.float8_e4m3fn and runner.kv.v[-1].dtype == torch.float8_e4m3fn
        outs.append(overlapped_generate(runner, prompts, params))
    assert outs[0] == outs[1] and [len(o) for o in outs[0]] == [12] * len(prompts)
