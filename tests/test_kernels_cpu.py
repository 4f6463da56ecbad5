"""The CPU paths of the kernel ops (what runs without Triton on CPU tensors: fewer torch ops in
the tensor's own dtype) against their references, at irregular sizes, float32 and bfloat16."""

import importlib

import pytest
import torch

from lightllm_async.kernels import (
    decode_attention,
    decode_attention_ref,
    decode_attention_rows,
    rms_norm,
    rope_cache,
    rotary_emb,
    rotary_emb_ref,
    silu_and_mul,
    use_triton,
)
from lightllm_async.kernels.rms_norm import rms_norm_ref
from lightllm_async.kernels.silu_and_mul import silu_and_mul_ref
from lightllm_async.kernels.testing import TOLERANCE, rel_err
from lightllm_async.models.llama import ForwardContext
from test_kernels_attention import make_cache
from test_kernels_pointwise import check_rms_norm, check_rotary, check_silu_and_mul

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.delenv("LLA_KERNELS", raising=False)
    assert not use_triton(torch.empty(1)), "run without TRITON_INTERPRET: this is the CPU path"


def _forbid(monkeypatch, module: str, name: str) -> None:
    def not_the_reference(*_):
        raise AssertionError(f"the CPU path must not call {name}")

    monkeypatch.setattr(importlib.import_module(f"lightllm_async.kernels.{module}"), name, not_the_reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (33, 576)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_cpu_path_follows_the_reference(shape, with_residual, dtype):
    check_rms_norm(shape, with_residual, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, inter", [(1, 5), (7, 77), (3, 1536)])
def test_silu_and_mul_cpu_path_follows_the_reference(num_tokens, inter, dtype):
    check_silu_and_mul(num_tokens, inter, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_cpu_paths_equal_the_reference_bit_for_bit(dtype):
    """Prefill runs them too: rounding differently from the reference moves logits (which bfloat16
    steps by 0.125 around 20) across near ties; the HF parity tests run float32."""
    x, res, w = (torch.randn(*s).to(dtype) for s in ((7, 576), (7, 576), (576,)))
    for out, ref in zip(rms_norm(x, w, 1e-5, res), rms_norm_ref(x, w, 1e-5, res), strict=True):
        assert torch.equal(out, ref)
    y = torch.randn(5, 2 * 1536).to(dtype)
    assert torch.equal(silu_and_mul(y), silu_and_mul_ref(y))
    qkv = torch.randn(13, 15 * 64).to(dtype)
    q, k = qkv[:, : 9 * 64].view(13, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(13, 3, 64)
    positions = torch.randint(0, 500, (13,))
    cos_sin = rope_cache(64, 512, 100000.0, None)
    for out, ref in zip(
        rotary_emb(q, k, positions, cos_sin), rotary_emb_ref(q, k, positions, cos_sin), strict=True
    ):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, heads, head_dim", [(1, (9, 3), 64), (7, (5, 1), 80), (13, (4, 4), 32)])
def test_rotary_emb_cpu_path_follows_the_reference(monkeypatch, num_tokens, heads, head_dim, dtype):
    _forbid(monkeypatch, "rotary", "rotary_emb_ref")
    check_rotary(num_tokens, heads, head_dim, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_lens, heads, head_dim",
    [([1], (9, 3), 64), ([17, 0, 130], (4, 2), 64), ([5, 257, 33, 2], (6, 6), 96), ([40], (8, 1), 128)],
)
def test_decode_attention_cpu_path_follows_the_reference(monkeypatch, seq_lens, heads, head_dim, dtype):
    """NaN in every cache row no request owns (make_cache): a gather past a context shows."""
    hq, hk = heads
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(seq_lens, hk, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), hq, head_dim, dtype=dtype)
    args = (q, k_cache, v_cache, req_to_token, req_idx, lens, head_dim**-0.5)
    ref = decode_attention_ref(*args)
    _forbid(monkeypatch, "decode_attention", "decode_attention_ref")
    out = decode_attention(*args)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_lens, heads, head_dim", [([1], (9, 3), 64), ([17, 1, 130], (4, 2), 64), ([5, 5], (6, 6), 96)]
)
def test_decode_attention_over_padded_rows_follows_the_reference(seq_lens, heads, head_dim, dtype):
    """The batched form a compiled CPU step runs: the contexts as rows padded to the longest
    (with each request's own first row, so the NaN rows no request owns are never read)."""
    hq, hk = heads
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(seq_lens, hk, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), hq, head_dim, dtype=dtype)
    ctx = ForwardContext(
        positions=lens.long() - 1, kv_slots=lens.long(), req_to_token=req_to_token, req_idx=req_idx,
        q_start=torch.arange(len(seq_lens) + 1, dtype=torch.int32), seq_lens=lens,
        logits_idx=torch.arange(len(seq_lens)), decode_only=True, host_seq_lens=tuple(seq_lens),
    ).with_decode_rows()  # fmt: skip
    assert ctx.decode_rows.shape == (len(seq_lens), max(seq_lens))
    assert (ctx.decode_mask is None) == (len(set(seq_lens)) == 1)
    out = decode_attention_rows(q, k_cache, v_cache, ctx.decode_rows, ctx.decode_mask, head_dim**-0.5)
    ref = decode_attention_ref(q, k_cache, v_cache, req_to_token, req_idx, lens, head_dim**-0.5)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]
