"""An MLA layer's new tokens into its cache in one launch: RMSNorm of the latent c_kv, rotary of the
rope key k_pe, both stored at the tokens' cache rows, and rotary of the rope queries q_pe.

Unfused that is three to four launches per layer (kv_a_layernorm, rotary_emb over q_pe and k_pe,
mla_store_kv) of a few microseconds each, for a few KiB per token: at batch 1 their fixed cost is
the whole cost (perf/RESULTS.md, DeepSeek-V2-Lite's decode step, ~25 launches per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton
from .mla_store_kv import mla_store_kv, mla_store_kv_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import _rotate_heads, rotary_emb, rotary_emb_ref


def mla_kv_store_ref(
    q_pe: Tensor,
    kv_a: Tensor,
    norm_weight: Tensor,
    eps: float,
    positions: Tensor,
    cos_sin: Tensor,
    kv_cache: Tensor,
    slots: Tensor,
) -> Tensor:
    # reads kv_a [T, R + P] and q_pe, writes the cache rows and q_pe: 2 * (kv_a + q_pe bytes)
    rank = norm_weight.shape[0]
    c_kv = rms_norm_ref(kv_a[:, :rank], norm_weight, eps)
    q_pe, k_pe = rotary_emb_ref(q_pe, kv_a[:, None, rank:], positions, cos_sin)
    mla_store_kv_ref(kv_cache, c_kv, k_pe[:, 0], slots)
    return q_pe


def _unfused(q_pe, kv_a, norm_weight, eps, positions, cos_sin, kv_cache, slots) -> Tensor:
    # the reference's ops through their own launchers: the CPU path of each where it has one
    rank = norm_weight.shape[0]
    c_kv = rms_norm(kv_a[:, :rank], norm_weight, eps)
    q_pe, k_pe = rotary_emb(q_pe, kv_a[:, None, rank:], positions, cos_sin)
    mla_store_kv(kv_cache, c_kv, k_pe, slots)
    return q_pe


@jit
def _mla_kv_store_kernel(
    Q_PE,  # [T, H, P] rope queries
    Q_OUT,  # [T, H, P] the rope queries rotated
    KV_A,  # [T, R + P] per token the latent c_kv then the rope key k_pe, as kv_a_proj gives them
    W,  # [R] the latent's norm weight
    POS,  # [T] position of each token
    COS_SIN,  # [max_pos, P] cos | sin halves, float32
    KV_CACHE,  # [S, R + P] per token the normed latent then the rotated rope key
    SLOTS,  # [T] cache row of each token
    stride_q_t, stride_q_h,  # Q_PE strides (token, head); the last dim is contiguous
    stride_qo_t, stride_qo_h,  # Q_OUT strides
    stride_a,  # KV_A row stride; rows are contiguous
    stride_cs,  # COS_SIN row stride
    stride_kv,  # KV_CACHE row stride
    H,  # query heads
    eps,  # added to the latent's mean square
    RANK: tl.constexpr,  # R
    HALF: tl.constexpr,  # P // 2
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    BLOCK_H: tl.constexpr,  # >= H, a power of two
    BLOCK_HALF: tl.constexpr,  # >= HALF, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program per token
    t = tl.program_id(0).to(tl.int64)
    a = KV_A + t * stride_a
    row = KV_CACHE + tl.load(SLOTS + t).to(tl.int64) * stride_kv

    # -- the latent: normalized in float32, rounded once, into the cache --
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    c = tl.load(a + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    w = tl.load(W + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    c = c * tl.math.rsqrt(tl.sum(c * c, axis=0) / RANK + eps) * w
    tl.store(row + offs_r, c.to(KV_CACHE.dtype.element_ty), mask=mask_r)

    # -- the token's cos and sin --
    pos = tl.load(POS + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask_d = offs_d < HALF
    cos = tl.load(COS_SIN + pos * stride_cs + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # -- the rope key into the cache row, then the queries --
    k1 = tl.load(a + RANK + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    k2 = tl.load(a + RANK + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(row + RANK + offs_d, (k1 * cos - k2 * sin).to(KV_CACHE.dtype.element_ty), mask=mask_d)
    tl.store(row + RANK + HALF + offs_d, (k2 * cos + k1 * sin).to(KV_CACHE.dtype.element_ty), mask=mask_d)
    _rotate_heads(
        Q_PE, Q_OUT, t, stride_q_t, stride_q_h, stride_qo_t, stride_qo_h, H, cos, sin, offs_d, HALF, BLOCK_H
    )


def mla_kv_store(
    q_pe: Tensor,
    kv_a: Tensor,
    norm_weight: Tensor,
    eps: float,
    positions: Tensor,
    cos_sin: Tensor,
    kv_cache: Tensor,
    slots: Tensor,
) -> Tensor:
    """kv_cache[slots[t]] = [rms_norm(c_kv[t]) * norm_weight, rotary(k_pe[t])] where kv_a[t] =
    [c_kv[t] (R), k_pe[t] (P)]; returns q_pe rotated by the same positions.

    q_pe [T, H, P] and kv_a [T, R + P] (rows may be strided: slices of a projection's output);
    norm_weight [R]; positions [T] int64; cos_sin [max_pos, P] float32 (cos | sin halves, neox
    rotation as `rotary_emb`); kv_cache [S, R + P]; slots [T] int32 or int64, distinct. q_pe,
    kv_a and kv_cache share a dtype. The rotated q_pe is a new tensor (not written in place: a
    program whose layout holds an element in several threads could read it after another wrote it).
    """
    if not use_triton(kv_a):
        return _unfused(q_pe, kv_a, norm_weight, eps, positions, cos_sin, kv_cache, slots)
    num_tokens, heads, rope = q_pe.shape
    rank = norm_weight.shape[0]
    assert kv_a.shape == (num_tokens, rank + rope), f"kv_a {tuple(kv_a.shape)}, q_pe {tuple(q_pe.shape)}"
    assert kv_cache.dim() == 2 and kv_cache.shape[1] == rank + rope and rope % 2 == 0
    assert positions.shape == slots.shape == (num_tokens,) and cos_sin.shape[1] == rope
    assert q_pe.dtype == kv_a.dtype == kv_cache.dtype, "q_pe, kv_a and the cache must share a dtype"
    assert q_pe.stride(2) == 1 and kv_a.stride(1) == 1 and kv_cache.stride(1) == 1 and cos_sin.stride(1) == 1
    q_out = torch.empty_like(q_pe)
    if num_tokens == 0:
        return q_out
    half = rope // 2
    _mla_kv_store_kernel[(num_tokens,)](
        q_pe, q_out, kv_a, norm_weight, positions, cos_sin, kv_cache, slots,
        q_pe.stride(0), q_pe.stride(1), q_out.stride(0), q_out.stride(1),
        kv_a.stride(0), cos_sin.stride(0), kv_cache.stride(0),
        heads, eps,
        RANK=rank, HALF=half, BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        **pdl_launch(kv_a),
    )  # fmt: skip
    return q_out
