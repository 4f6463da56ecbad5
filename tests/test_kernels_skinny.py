"""skinny_linear (y = x W^T for a few rows) against its reference: in the Triton interpreter on CPU
tensors at small irregular sizes, compiled on CUDA at the decode projections' shapes (Llama-3-8B
whole and at TP=2, DeepSeek-V2-Lite), in a CUDA graph too; and `linear`, the layers' router between
it and cuBLAS. Tolerances: kernels.testing.TOLERANCE (float32 1e-4, bfloat16 1e-2)."""

import pytest
import torch
import torch.nn.functional as F

from lightllm_async.kernels.skinny_linear import (
    MAX_ROWS,
    SkinnyConfig,
    linear,
    skinny_linear,
    skinny_linear_ref,
)
from lightllm_async.kernels.testing import TOLERANCE, nan_filled_allocations, rel_err


def check_skinny(m, n, k, dtype, device, bias=False, out_dtype=None, config=None, x_stride_pad=0):
    x = torch.randn(m, k + x_stride_pad, dtype=dtype, device=device)[:, :k]  # rows strided
    w = torch.randn(n, k, dtype=dtype, device=device) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    with nan_filled_allocations():
        y = skinny_linear(x, w, b, out_dtype, config)
    ref = skinny_linear_ref(x, w, b, out_dtype)
    assert y.shape == (m, n) and y.dtype == (out_dtype or dtype) and not y.isnan().any()
    assert rel_err(y, ref) < TOLERANCE[dtype], rel_err(y, ref)
    return y


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n, k", [(17, 33), (100, 200), (48, 64)])
def test_skinny_linear_matches_reference_in_interpreter(interpreter, m, n, k):
    check_skinny(m, n, k, torch.float32, "cpu", x_stride_pad=5)


def test_skinny_linear_bias_and_float32_out_in_interpreter(interpreter):
    check_skinny(2, 40, 72, torch.float32, "cpu", bias=True)
    y = check_skinny(3, 64, 96, torch.bfloat16, "cpu", out_dtype=torch.float32)
    assert y.dtype == torch.float32


def test_skinny_linear_keeps_leading_dims_and_takes_no_rows(interpreter):
    x, w = torch.randn(2, 3, 48), torch.randn(20, 48)
    assert torch.allclose(skinny_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    assert skinny_linear(torch.randn(0, 48), w).shape == (0, 20)


def test_linear_takes_cublas_off_cuda_and_for_many_rows():
    x, w, b = torch.randn(3, 48), torch.randn(20, 48), torch.randn(20)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # CPU: never the kernel
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb, wb, out_dtype=torch.float32), F.linear(xb.float(), wb.float()))


GPU_SHAPES = [  # (N, K): a decode step's projections
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),  # Llama-3-8B q|k|v, o, gate|up, down
    (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168),  # the same at TP=2
    (3648, 2048), (2048, 2048), (64, 2048),  # DeepSeek-V2-Lite q|kv_a, o, router
    (1000, 1000),  # odd sizes
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, MAX_ROWS, 16])
def test_skinny_linear_matches_reference_on_gpu(gpu, m):
    for n, k in GPU_SHAPES:
        check_skinny(m, n, k, torch.bfloat16, "cuda")
    check_skinny(m, 64, 2048, torch.bfloat16, "cuda", out_dtype=torch.float32)
    check_skinny(m, 3000, 896, torch.bfloat16, "cuda", bias=True, x_stride_pad=8)
    for cfg in (SkinnyConfig(16, 512), SkinnyConfig(32, 512, 8, 3), SkinnyConfig(64, 256, 4, 6)):
        check_skinny(m, 4096, 2048, torch.bfloat16, "cuda", config=cfg)


def test_routing_by_shape():
    from lightllm_async.kernels import skinny_linear as S

    assert S.MODE == "1"  # the default
    assert S.routed(3072, 4096) and S.routed(28672, 4096) and S.routed(4096, 14336)  # Llama-3-8B (TP=2)
    assert not S.routed(2048, 2048) and not S.routed(21888, 2048) and not S.routed(2048, 10944)  # V2-Lite


@pytest.mark.gpu
def test_linear_routes_few_rows_to_the_kernel_and_replays_in_a_cuda_graph(gpu):
    w = torch.randn(3072, 4096, dtype=torch.bfloat16, device="cuda") * 4096**-0.5
    x = torch.randn(MAX_ROWS, 4096, dtype=torch.bfloat16, device="cuda")
    y = linear(x, w)
    assert torch.equal(y, skinny_linear(x, w))  # the same kernel, the same bits
    assert torch.equal(linear(x.repeat(2, 1), w), F.linear(x.repeat(2, 1), w))  # more rows: cuBLAS
    w2 = w[:2048, :2048].contiguous()
    assert torch.equal(linear(x[:, :2048], w2), F.linear(x[:, :2048], w2))  # a shape cuBLAS does better
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, skinny_linear(x, w))


def test_no_programmatic_dependent_launch_off_cuda():
    from lightllm_async.kernels.backend import pdl

    assert not pdl(torch.randn(2))  # CPU tensors (and the interpreter): plain launches, no gdc_wait


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(3072, 4096), (4096, 7168), (1000, 1000)])
def test_linear_reads_its_input_only_after_the_kernel_before_it_finishes(gpu, n, k):
    """Under programmatic dependent launch (Hopper) rms_norm lets the projection start early and the
    projection reads x only after gdc_wait: in a replayed graph every output is that of the new
    input, never a stale x (the chain the decode layer runs: norm -> q|k|v)."""
    from lightllm_async.kernels import rms_norm
    from lightllm_async.kernels.rms_norm import rms_norm_ref

    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    norm_w = torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5
    src = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(rms_norm(src, norm_w, 1e-5), w)
    for _ in range(20):
        src.copy_(torch.randn_like(src) * (1 + 10 * torch.rand(1, device="cuda")))
        graph.replay()
        ref = skinny_linear_ref(rms_norm_ref(src, norm_w, 1e-5), w)
        assert rel_err(y, ref) < TOLERANCE[torch.bfloat16], rel_err(y, ref)
