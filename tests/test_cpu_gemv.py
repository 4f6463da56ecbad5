"""The `_gemv` products (kernels/cpu_gemv.py, csrc/gemv.c) against the float weights they stand for,
on every instruction set the machine has, and as custom ops under torch.compile.

Tolerance: the activations are rounded to int16 per block of 32 (a step of max|x_block| / 32767),
so an output may move by `activation_bound` (half a step times the block's sum of |W|) and no
more; the integer sums are exact, and float32 arithmetic adds ~1e-6 of sum |w x|. A wrong nibble,
pair order or group moves outputs by orders of magnitude more than that."""

from __future__ import annotations

import pytest
import torch

from lightllm_async.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="the _gemv extension is not built")

# (rows, inputs, outputs): K a multiple of 32, N odd or below a tile, M across a pass of 4 rows
SHAPES = [(1, 32, 1), (1, 576, 960), (2, 96, 17), (3, 800, 33), (5, 1536, 48), (8, 64, 257), (13, 160, 7)]


@pytest.fixture(params=[3, 2, 0], ids=["avx512vnni", "avx2", "plain-c"])
def level(request):
    """Run a test at one instruction-set level (skipped where the CPU has not got it)."""
    have = cpu_gemv.native.level()
    if request.param > have:
        pytest.skip(f"the CPU runs level {have} at most")
    cpu_gemv.native.set_level(request.param)
    yield request.param
    cpu_gemv.native.set_level(have)


def random_int4(n: int, k: int, gen: torch.Generator):
    """Codes, and float16-exact scales and mins (as Q4_1's) of unequal size per group."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.02).half().float()
    mn = (-torch.rand(n, k // 32, generator=gen) * 0.15).half().float()
    return codes, scale, mn


def within_bound(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, terms: torch.Tensor):
    bound = cpu_gemv.activation_bound(x, w) + 1e-5 * (x.double().abs() @ terms.double().T) + 1e-30
    return float(((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_products_stay_within_the_int16_activation_bound(level, m, k, n, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    codes, scale, mn = random_int4(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen) * 4).to(dtype)  # uneven blocks
    w_packed, sm = cpu_gemv.pack_int4(codes, scale, mn)
    y = cpu_gemv.int4_mm(x, w_packed, sm, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    groups = codes.view(n, k // 32, 32).float()
    w = (groups * scale[..., None] + mn[..., None]).view(n, k)
    terms = ((groups * scale[..., None]).abs() + mn.abs()[..., None]).view(n, k)
    ref = cpu_gemv.int4_mm_ref(x.float(), codes, scale, mn)
    assert within_bound(y, ref, x.float(), w, terms) <= 1.0


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_products_stay_within_the_int16_activation_bound(level, m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + n + 1)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    row_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    x = torch.randn(m, k, generator=gen).bfloat16()
    w_packed, rs = cpu_gemv.pack_int8(codes, row_scale)
    y = cpu_gemv.int8_mm(x, w_packed, rs, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    w = codes.float() * row_scale[:, None]
    ref = x.double() @ w.double().T
    assert within_bound(y, ref, x.float(), w, w) <= 1.0


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (3, 96, 17), (6, 64, 41)])
def test_bfloat16_outputs_are_the_float32_ones_rounded_to_nearest_even(level, m, k, n):
    gen = torch.Generator().manual_seed(n)
    codes, scale, mn = random_int4(n, k, gen)
    w, sm = cpu_gemv.pack_int4(codes, scale, mn)
    w8, rs = cpu_gemv.pack_int8(
        torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n)
    )
    x = torch.randn(m, k, generator=gen).bfloat16()
    for fn, weights in ((cpu_gemv.int4_mm, (w, sm)), (cpu_gemv.int8_mm, (w8, rs))):
        y32, y16 = (fn(x, *weights, n, dtype) for dtype in (torch.float32, torch.bfloat16))
        assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.bfloat16())


def test_every_instruction_set_gives_the_same_sums():
    """The same int16 activations and integer sums on every path: outputs agree to float32
    rounding (the paths only order the float additions differently)."""
    have = cpu_gemv.native.level()
    gen = torch.Generator().manual_seed(7)
    codes, scale, mn = random_int4(257, 800, gen)
    w, sm = cpu_gemv.pack_int4(codes, scale, mn)
    x = torch.randn(6, 800, generator=gen)
    outs = []
    try:
        for lvl in (0, 2, 3):
            if cpu_gemv.native.set_level(lvl) == lvl:
                outs.append(cpu_gemv.int4_mm(x, w, sm, 257))
    finally:
        cpu_gemv.native.set_level(have)
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-5)


def test_no_rows_zero_rows_and_tiny_blocks(level):
    """No rows: an empty result; a zero row: zeros; a block of values ~1e-38 (where 32767 / max
    would overflow) counts as zeros instead of poisoning the row with inf or NaN."""
    codes, scale, mn = random_int4(16, 64, torch.Generator().manual_seed(1))
    w, sm = cpu_gemv.pack_int4(codes, scale, mn)
    assert cpu_gemv.int4_mm(torch.zeros(0, 64), w, sm, 16).shape == (0, 16)
    assert torch.equal(cpu_gemv.int4_mm(torch.zeros(1, 64), w, sm, 16), torch.zeros(1, 16))
    x = torch.full((1, 64), 1e-38)
    x[0, :32] = torch.randn(32)
    ref = cpu_gemv.int4_mm_ref(x, codes, scale, mn)
    torch.testing.assert_close(cpu_gemv.int4_mm(x, w, sm, 16).double(), ref, rtol=1e-4, atol=1e-4)


def test_the_products_compile_into_one_graph_with_inductor():
    """`fullgraph=True` fails on a graph break: the custom ops and their fake implementations
    let inductor call the kernels inside the compiled graph, with the eager results."""
    pytest.importorskip("torch._inductor")
    gen = torch.Generator().manual_seed(3)
    codes, scale, mn = random_int4(96, 64, gen)
    w4, sm = cpu_gemv.pack_int4(codes, scale, mn)
    codes8 = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=gen)
    w8, rs = cpu_gemv.pack_int8(codes8, torch.rand(40))

    def step(x):
        h = torch.nn.functional.silu(cpu_gemv.int4_mm(x, w4, sm, 96))  # [M, 96]
        return cpu_gemv.int8_mm(h.bfloat16(), w8, rs, 40) * 2

    x = torch.randn(3, 64, generator=gen)
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-4, atol=1e-4)


def test_without_the_extension_the_layers_keep_torchs_kernels(monkeypatch):
    """A machine where `_gemv` is not built: Int4Linear packs for torch's int4 kernel, the head
    for torch's int8 one (handing over to F.linear from 6 rows), with the same results."""
    from lightllm_async.layers.quantized import Int4Linear, Int4Weight, Int8Head

    gen = torch.Generator().manual_seed(11)
    codes, scale, mn = random_int4(48, 96, gen)
    x = torch.randn(3, 96, generator=gen).bfloat16()
    head_weight = torch.randn(40, 96, generator=gen).bfloat16()
    ref = cpu_gemv.int4_mm_ref(x.float(), codes, scale, mn)
    for built in (True, False):
        if not built:
            monkeypatch.setattr(cpu_gemv, "native", None)
        layer = Int4Linear(96, {"": 48}, False, torch.bfloat16, "cpu")
        layer.load_part(None, "weight", Int4Weight(codes, scale, mn))
        layer.finish_loading()
        head = Int8Head(head_weight)
        assert layer.gemv == head.gemv == built and hasattr(layer, "packed") != built
        assert head.rows == (16 if built else 6)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and float((y.double() - ref).abs().max() / ref.abs().max()) < 0.02
        logits = head.logits(x)
        torch.testing.assert_close(logits, x.float() @ head.dequantized().T, rtol=0.02, atol=0.05)
