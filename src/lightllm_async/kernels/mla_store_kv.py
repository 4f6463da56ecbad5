"""Scatter the new tokens' latent and rope key into their MLA cache rows (page size 1).

store_kv does not fit: it writes a key and a value of one [S, H, D] shape into two caches, while an
MLA layer has one cache [S, R + P] whose row is the latent c_kv [R] followed by the rope key [P]."""

from __future__ import annotations

from torch import Tensor

from .backend import jit, tl, triton, use_triton


def mla_store_kv_ref(kv_cache: Tensor, c_kv: Tensor, k_pe: Tensor, slots: Tensor) -> None:
    # reads c_kv and k_pe, writes as many bytes into the cache: 2 * (c_kv.nbytes + k_pe.nbytes)
    rank = c_kv.shape[-1]
    kv_cache[slots, :rank] = c_kv.to(kv_cache.dtype)
    kv_cache[slots, rank:] = k_pe.to(kv_cache.dtype)


@jit
def _mla_store_kv_kernel(
    KV_CACHE,  # [S, R + P] per token: latent then rope key
    C_KV,  # [T, R] new latents
    K_PE,  # [T, P] new rope keys (rotated already)
    SLOTS,  # [T] cache row of each new token
    stride_kv,  # KV_CACHE row stride; the row is contiguous
    stride_c,  # C_KV row stride
    stride_pe,  # K_PE row stride
    KV_LORA_RANK: tl.constexpr,  # R
    ROPE_DIM: tl.constexpr,  # P
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    BLOCK_P: tl.constexpr,  # >= P, a power of two
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    row = KV_CACHE + tl.load(SLOTS + t).to(tl.int64) * stride_kv
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)

    c = tl.load(C_KV + t * stride_c + offs_r, mask=offs_r < KV_LORA_RANK)
    tl.store(row + offs_r, c.to(KV_CACHE.dtype.element_ty), mask=offs_r < KV_LORA_RANK)
    pe = tl.load(K_PE + t * stride_pe + offs_p, mask=offs_p < ROPE_DIM)
    tl.store(row + KV_LORA_RANK + offs_p, pe.to(KV_CACHE.dtype.element_ty), mask=offs_p < ROPE_DIM)


def mla_store_kv(kv_cache: Tensor, c_kv: Tensor, k_pe: Tensor, slots: Tensor) -> None:
    """kv_cache[slots[t]] = cat(c_kv[t], k_pe[t]), in place.

    kv_cache: [S, R + P]; c_kv: [T, R]; k_pe: [T, P] or [T, 1, P] (cast to the cache's dtype; rows
    may be strided, e.g. slices of one projection's output); slots: [T] int32 or int64, distinct.
    """
    if k_pe.dim() == 3:
        assert k_pe.shape[1] == 1, f"k_pe {tuple(k_pe.shape)}: MLA has one rope key per token"
        k_pe = k_pe[:, 0]
    if not use_triton(c_kv):
        return mla_store_kv_ref(kv_cache, c_kv, k_pe, slots)
    num_tokens, rank = c_kv.shape
    rope = k_pe.shape[-1]
    assert k_pe.shape == (num_tokens, rope) and kv_cache.dim() == 2 and kv_cache.shape[1] == rank + rope
    assert slots.shape == (num_tokens,), f"slots {tuple(slots.shape)} for {num_tokens} tokens"
    assert kv_cache.stride(1) == 1 and c_kv.stride(1) == 1 and k_pe.stride(1) == 1
    if num_tokens == 0:
        return None
    _mla_store_kv_kernel[(num_tokens,)](
        kv_cache, c_kv, k_pe, slots,
        kv_cache.stride(0), c_kv.stride(0), k_pe.stride(0),
        KV_LORA_RANK=rank, ROPE_DIM=rope,
        BLOCK_R=triton.next_power_of_2(rank), BLOCK_P=triton.next_power_of_2(rope), num_warps=4,
    )  # fmt: skip
    return None
