"""RMSNorm, SiLU-and-mul and rotary kernels against their references (interpreter on CPU at small
irregular sizes, compiled on CUDA at real sizes), and the rope cache against transformers."""

import pytest
import torch

from lightllm_async.kernels import (
    rms_norm,
    rms_norm_ref,
    rope_cache,
    rotary_emb,
    rotary_emb_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from lightllm_async.kernels.testing import (
    TOLERANCE,
    nan_filled_allocations,
    rel_err,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def check_rms_norm(shape, with_residual, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    with nan_filled_allocations():
        out = rms_norm(x, weight, 1e-5, residual)
    ref = rms_norm_ref(x, weight, 1e-5, residual)
    outs, refs = (out, ref) if with_residual else ((out,), (ref,))
    for o, r in zip(outs, refs, strict=True):
        assert o.shape == r.shape and not o.isnan().any()
        assert rel_err(o, r) < TOLERANCE[dtype]


def check_silu_and_mul(num_tokens, inter, dtype, device):
    x = torch.randn(num_tokens, 2 * inter, dtype=dtype, device=device)
    with nan_filled_allocations():
        out = silu_and_mul(x)
    assert out.shape == (num_tokens, inter) and not out.isnan().any()
    assert rel_err(out, silu_and_mul_ref(x)) < TOLERANCE[dtype]


def check_rotary(num_tokens, heads, head_dim, dtype, device, max_pos=300, store=False):
    """`store`: the launch also writes the rotated keys and the values into cache rows (the
    decode layer's fused rotary + store_kv): exactly those rows, as store_kv_ref writes them."""
    hq, hk = heads
    scaling = LLAMA3_SCALING | {"original_max_position_embeddings": 64}  # scaled within max_pos
    cos_sin = rope_cache(head_dim, max_pos, 500000.0, scaling, device)
    # q, k and v are views into one fused projection output, as the model makes them
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(num_tokens, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim :].view(num_tokens, hk, head_dim)
    before = qkv.clone()
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    q_ref, k_ref = rotary_emb_ref(q, k, positions, cos_sin)
    args = None
    if store:
        rows = num_tokens + 17
        k_cache = torch.full((rows, hk, head_dim), 7.0, dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, 9.0)
        slots = torch.randperm(rows, device=device)[:num_tokens]
        args = (k_cache, v_cache, v, slots)
    with nan_filled_allocations():
        q_out, k_out = rotary_emb(q, k, positions, cos_sin, store=args)
    assert not q_out.isnan().any() and not k_out.isnan().any()
    assert rel_err(q_out, q_ref) < TOLERANCE[dtype] and rel_err(k_out, k_ref) < TOLERANCE[dtype]
    assert torch.equal(qkv, before)  # q, k and v untouched
    if store:
        assert torch.equal(k_cache[slots], k_out), "the cache holds the same rotated keys as k_out"
        assert torch.equal(v_cache[slots], v)
        others = torch.ones(rows, dtype=torch.bool, device=device)
        others[slots] = False
        assert k_cache[others].eq(7.0).all() and v_cache[others].eq(9.0).all(), "only the slots' rows"


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("hidden", [64, 100, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference_in_interpreter(interpreter, num_tokens, hidden, with_residual):
    check_rms_norm((num_tokens, hidden), with_residual, torch.float32, "cpu")


def test_rms_norm_keeps_leading_dims(interpreter):
    check_rms_norm((2, 5, 96), True, torch.float32, "cpu")


def check_rms_norm_of_parts(num_tokens, parts, hidden, dtype, device):
    """The input as the unsummed parts of a sum ([T, P, H], MoE's per-expert outputs), strided
    as fused_moe leaves them: equal to the norm of their torch.sum."""
    x = torch.randn(num_tokens, parts, hidden + 3, dtype=dtype, device=device)[..., :hidden]
    weight = torch.randn(hidden, dtype=dtype, device=device)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    with nan_filled_allocations():
        out, res = rms_norm(x, weight, 1e-5, residual)
    ref, ref_res = rms_norm_ref(x.sum(dim=1), weight, 1e-5, residual)
    assert out.shape == res.shape == (num_tokens, hidden)
    assert torch.equal(res, ref_res) if dtype == torch.float32 else rel_err(res, ref_res) < 1e-2
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_tokens, parts, hidden", [(1, 8, 64), (7, 3, 100), (5, 1, 32)])
def test_rms_norm_sums_the_parts_of_its_input_in_interpreter(interpreter, num_tokens, parts, hidden):
    check_rms_norm_of_parts(num_tokens, parts, hidden, torch.float32, "cpu")


def test_rms_norm_of_parts_on_the_cpu_paths():
    x, residual, weight = torch.randn(3, 4, 16), torch.randn(3, 16), torch.randn(16)
    for dtype in (torch.float32, torch.bfloat16):
        out, res = rms_norm(x.to(dtype), weight.to(dtype), 1e-5, residual.to(dtype))
        ref, ref_res = rms_norm(x.to(dtype).sum(1), weight.to(dtype), 1e-5, residual.to(dtype))
        assert torch.equal(out, ref) and torch.equal(res, ref_res)


def test_rms_norm_residual_out_is_the_sum(interpreter):
    x, residual = torch.randn(2, 7, 64)
    _, residual_out = rms_norm(x, torch.ones(64), 1e-6, residual)
    assert torch.equal(residual_out, x + residual)


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("inter", [5, 77, 1500])
def test_silu_and_mul_matches_reference_in_interpreter(interpreter, num_tokens, inter):
    check_silu_and_mul(num_tokens, inter, torch.float32, "cpu")


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("heads, head_dim", [((4, 2), 64), ((6, 6), 128), ((3, 1), 32)])
@pytest.mark.parametrize("store", [False, True])
def test_rotary_emb_matches_reference_in_interpreter(interpreter, num_tokens, heads, head_dim, store):
    check_rotary(num_tokens, heads, head_dim, torch.float32, "cpu", store=store)


@pytest.mark.parametrize("num_tokens", [1, 7, 13])
@pytest.mark.parametrize("heads", [(5, 1), (6, 2), (7, 7)])
@pytest.mark.parametrize("head_dim", [80, 96])
def test_rotary_emb_pads_head_dims_that_are_not_powers_of_two(interpreter, num_tokens, heads, head_dim):
    check_rotary(num_tokens, heads, head_dim, torch.float32, "cpu", store=num_tokens == 7)


@pytest.mark.parametrize("store", [False, True])
def test_rotary_emb_reference_paths_store_too(store):
    check_rotary(5, (4, 2), 64, torch.float32, "cpu", store=store)


def test_rotary_emb_at_position_zero_is_identity():
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    q_out, k_out = rotary_emb(q, k, torch.zeros(3, dtype=torch.int64), rope_cache(64, 8, 10000.0, None))
    assert torch.allclose(q_out, q) and torch.allclose(k_out, k)


@pytest.mark.parametrize(
    "rope_scaling", [None, {"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING]
)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rope_cache_equals_transformers(rope_scaling, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta, max_pos = 500000.0, 300
    config = transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_theta=theta,
        rope_scaling=rope_scaling, max_position_embeddings=16384,
    )  # fmt: skip
    cos_sin = rope_cache(head_dim, max_pos, theta, rope_scaling, "cpu")
    positions = torch.arange(max_pos)[None, :]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    assert torch.equal(cos_sin[:, :half], cos[0, :, :half])
    assert torch.equal(cos_sin[:, half:], sin[0, :, :half])
    if rope_scaling == LLAMA3_SCALING:
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
        assert torch.equal(cos_sin[1, :half], inv_freq.cos())
        unscaled = rope_cache(head_dim, max_pos, theta, None, "cpu")
        assert not torch.equal(cos_sin[:, half - 1], unscaled[:, half - 1])  # low frequencies slowed


def test_rope_cache_rejects_unknown_scaling():
    with pytest.raises(NotImplementedError):
        rope_cache(64, 8, 10000.0, {"rope_type": "yarn", "factor": 4.0}, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference_on_gpu(gpu, with_residual):
    check_rms_norm((4099, 4096), with_residual, torch.bfloat16, "cuda")
    check_rms_norm((64, 8192), with_residual, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_rms_norm_sums_the_parts_of_its_input_on_gpu(gpu):
    check_rms_norm_of_parts(1, 8, 2048, torch.bfloat16, "cuda")
    check_rms_norm_of_parts(7, 6, 7168, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_silu_and_mul_matches_reference_on_gpu(gpu):
    check_silu_and_mul(4099, 14336, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [((32, 8), 128), ((40, 8), 80), ((24, 8), 96)])
def test_rotary_emb_matches_reference_on_gpu(gpu, heads, head_dim):
    check_rotary(4099, heads, head_dim, torch.bfloat16, "cuda", max_pos=8192)
    check_rotary(4099, heads, head_dim, torch.bfloat16, "cuda", max_pos=8192, store=True)
