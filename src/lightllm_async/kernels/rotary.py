"""Rotary position embedding, HF Llama `rotate_half` (neox) form, with linear and Llama-3 scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightllm_async.config import SUPPORTED_ROPE_TYPES, rope_type

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_cpu_path, use_triton
from .store_kv import store_kv, to_cache


def _inv_freq(head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None) -> Tensor:
    # the same float32 operations, in the same order, as transformers' rope init functions
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    kind = rope_type(rope_scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling type {kind!r}; supported: {SUPPORTED_ROPE_TYPES}")
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cache(
    head_dim: int,
    max_pos: int,
    theta: float,
    rope_scaling: Mapping[str, Any] | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """cos_sin [max_pos, head_dim] float32: cos(pos * inv_freq) in the first head_dim/2 columns,
    sin in the last. rope_scaling: None, {"rope_type": "default"}, {"rope_type": "linear",
    "factor"} or Llama-3's {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}."""
    inv_freq = _inv_freq(head_dim, float(theta), rope_scaling)  # on the CPU, as HF computes it
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [T, H, D]; cos, sin [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_emb_ref(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    # reads q, k and a cos_sin row per token, writes q and k: 2 * (q.nbytes + k.nbytes) + T * D * 4
    cos, sin = cos_sin[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def rotary_emb_cpu(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    """The CPU path: the reference's float32 arithmetic, bit for bit, with one gather of the
    rows for q and k and no float copy of x (its dtype is promoted by the products): 8 ops a
    tensor where the reference dispatches 12. (Not `out=` into halves of one buffer: a graph
    break under torch.compile. Nor addcmul: its rounding differs, and on a bfloat16 model that
    flipped a near-tie first token of SmolLM2's France prompt, whose logits step by 0.125.)"""
    cs = cos_sin.index_select(0, positions)[:, None, :]  # [T, 1, D] float32
    half = cs.shape[-1] // 2
    cos, sin = cs[..., :half], cs[..., half:]
    return _rotate_cpu(q, cos, sin), _rotate_cpu(k, cos, sin)


def _rotate_cpu(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # x's dtype, promoted to float32 by the products (exactly)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@jit
def _rotate_heads(
    X,  # [T, H, D] this tensor's rows to rotate
    Y,  # [T, H, D] where the rotated rows go
    t,  # the token
    stride_x_t, stride_x_h,  # X strides (token, head); the head dim is contiguous
    stride_y_t, stride_y_h,  # Y strides
    H,  # heads
    cos,  # [1, BLOCK_HALF] float32
    sin,  # [1, BLOCK_HALF] float32
    offs_d,  # [1, BLOCK_HALF] offsets into the first half
    HALF,  # head_dim // 2
    BLOCK_H: tl.constexpr,  # >= H, a power of two
):  # fmt: skip
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for every head of token t
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    mask = (offs_h < H) & (offs_d < HALF)
    x = X + t * stride_x_t + offs_h * stride_x_h + offs_d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    y = Y + t * stride_y_t + offs_h * stride_y_h + offs_d
    tl.store(y, to_cache(x1 * cos - x2 * sin, Y.dtype.element_ty), mask=mask)
    tl.store(y + HALF, to_cache(x2 * cos + x1 * sin, Y.dtype.element_ty), mask=mask)


@jit
def _rotary_kernel(
    Q,  # [T, Hq, D] queries to rotate
    K,  # [T, Hk, D] keys to rotate
    Q_OUT,  # [T, Hq, D] rotated queries
    K_OUT,  # [T, Hk, D] rotated keys
    POS,  # [T] position of each token
    COS_SIN,  # [max_pos, D] cos | sin halves, float32
    K_CACHE,  # [S, Hk, D] key cache: row SLOTS[t] gets the rotated key too (if STORE)
    V_CACHE,  # [S, Hk, D] value cache: row SLOTS[t] gets V[t] (if STORE)
    V,  # [T, Hk, D] values
    SLOTS,  # [T] cache row of each token
    stride_q_t, stride_q_h,  # Q strides (token, head); the head dim is contiguous
    stride_k_t, stride_k_h,  # K strides
    stride_qo_t, stride_qo_h,  # Q_OUT strides
    stride_ko_t, stride_ko_h,  # K_OUT strides
    stride_kc_s, stride_kc_h,  # K_CACHE strides (row, head)
    stride_vc_s, stride_vc_h,  # V_CACHE strides
    stride_v_t, stride_v_h,  # V strides
    stride_cs,  # COS_SIN row stride
    HQ,  # query heads
    HK,  # key heads
    HALF,  # head_dim // 2
    STORE: tl.constexpr,  # also write the rotated keys and the values into the caches
    BLOCK_HQ: tl.constexpr,  # >= HQ, a power of two
    BLOCK_HK: tl.constexpr,  # >= HK, a power of two
    BLOCK_HALF: tl.constexpr,  # >= HALF, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program rotates all heads of one token
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]

    # -- the token's cos and sin --
    cos = tl.load(COS_SIN + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + offs_d, mask=offs_d < HALF, other=0.0)
    sin = sin.to(tl.float32)

    # -- queries, then keys --
    _rotate_heads(
        Q, Q_OUT, t, stride_q_t, stride_q_h, stride_qo_t, stride_qo_h, HQ, cos, sin, offs_d, HALF, BLOCK_HQ
    )
    _rotate_heads(
        K, K_OUT, t, stride_k_t, stride_k_h, stride_ko_t, stride_ko_h, HK, cos, sin, offs_d, HALF, BLOCK_HK
    )

    # -- the token's cache row: its rotated keys (row SLOTS[t] for every t: stride 0) and values --
    if STORE:
        slot = tl.load(SLOTS + t).to(tl.int64)
        k_row = K_CACHE + slot * stride_kc_s
        _rotate_heads(
            K, k_row, t, stride_k_t, stride_k_h, 0, stride_kc_h, HK, cos, sin, offs_d, HALF, BLOCK_HK
        )
        offs_h = tl.arange(0, BLOCK_HK)[:, None]
        offs = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (offs_h < HK) & (offs < 2 * HALF)
        v = tl.load(V + t * stride_v_t + offs_h * stride_v_h + offs, mask=mask)
        v_row = V_CACHE + slot * stride_vc_s + offs_h * stride_vc_h + offs
        tl.store(v_row, to_cache(v, V_CACHE.dtype.element_ty), mask=mask)


def rotary_emb(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    cos_sin: Tensor,
    store: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by their tokens' positions [T] (int64) into new tensors.

    `store` = (k_cache, v_cache, v, slots): also `store_kv(k_cache, v_cache, rotated k, v, slots)`,
    in the same launch (a decode layer's rotary and cache write were two)."""
    if not use_triton(q):
        fallback = rotary_emb_cpu if use_cpu_path(q) else rotary_emb_ref
        q_out, k_out = fallback(q, k, positions, cos_sin)
        if store is not None:
            k_cache, v_cache, v, slots = store
            store_kv(k_cache, v_cache, k_out, v, slots)
        return q_out, k_out
    num_tokens, hq, dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == dim and dim % 2 == 0, f"q {q.shape}, k {k.shape}"
    assert positions.shape == (num_tokens,) and cos_sin.shape[1] == dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens == 0:
        return q_out, k_out
    hk, half = k.shape[1], dim // 2
    if store is not None:
        k_cache, v_cache, v, slots = store
        assert v.shape == k.shape and k_cache.shape[1:] == k.shape[1:] and v_cache.shape == k_cache.shape
        assert slots.shape == (num_tokens,), f"slots {tuple(slots.shape)} for {num_tokens} tokens"
        for t in (k_cache, v_cache, v):
            assert t.stride(-1) == 1, "the head dim must be contiguous"
    else:
        k_cache = v_cache = v = k
        slots = positions
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin, k_cache, v_cache, v, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        v.stride(0), v.stride(1),
        cos_sin.stride(0), hq, hk, half,
        STORE=store is not None,
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl_launch(q),
    )  # fmt: skip
    return q_out, k_out
