"""Scatter the new tokens' keys and values into their KV cache rows (page size 1)."""

from __future__ import annotations

from torch import Tensor

from .backend import jit, tl, triton, use_triton


def store_kv_ref(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    # reads k and v, writes as many bytes into the caches: 2 * (k.nbytes + v.nbytes)
    k_cache[slots] = k.to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)


@jit
def to_cache(x, DTYPE: tl.constexpr):
    """x converted for a KV cache of DTYPE: into a float8 e4m3 cache (--kv-cache-dtype fp8) first
    clamped to its +-448, so that a large value saturates as torch's conversion does (the
    interpreter's wraps) instead of depending on the conversion's overflow."""
    if tl.float8e4nv == DTYPE:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
    return x.to(DTYPE)


@jit
def _store_kv_kernel(
    K_CACHE,  # [S, H, D] key cache
    V_CACHE,  # [S, H, D] value cache
    K,  # [T, H, D] new keys
    V,  # [T, H, D] new values
    SLOTS,  # [T] cache row of each new token
    stride_kc_s, stride_kc_h,  # K_CACHE strides (row, head); the head dim is contiguous
    stride_vc_s, stride_vc_h,  # V_CACHE strides
    stride_k_t, stride_k_h,  # K strides
    stride_v_t, stride_v_h,  # V strides
    H,  # kv heads
    D,  # head dim
    BLOCK_H: tl.constexpr,  # >= H, a power of two
    BLOCK_D: tl.constexpr,  # >= D, a power of two
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < H) & (offs_d < D)

    k = tl.load(K + t * stride_k_t + offs_h * stride_k_h + offs_d, mask=mask)
    k = to_cache(k, K_CACHE.dtype.element_ty)
    tl.store(K_CACHE + slot * stride_kc_s + offs_h * stride_kc_h + offs_d, k, mask=mask)
    v = tl.load(V + t * stride_v_t + offs_h * stride_v_h + offs_d, mask=mask)
    v = to_cache(v, V_CACHE.dtype.element_ty)
    tl.store(V_CACHE + slot * stride_vc_s + offs_h * stride_vc_h + offs_d, v, mask=mask)


def store_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t], in place.

    k_cache, v_cache: [S, Hk, D]; k, v: [T, Hk, D] (cast to the caches' dtype); slots: [T] int64, distinct.
    """
    if not use_triton(k):
        return store_kv_ref(k_cache, v_cache, k, v, slots)
    num_tokens, heads, dim = k.shape
    assert v.shape == k.shape and k_cache.shape[1:] == k.shape[1:] and v_cache.shape == k_cache.shape
    assert slots.shape == (num_tokens,), f"slots {tuple(slots.shape)} for {num_tokens} tokens"
    for t in (k_cache, v_cache, k, v):
        assert t.stride(-1) == 1, "the head dim must be contiguous"
    if num_tokens == 0:
        return None
    _store_kv_kernel[(num_tokens,)](
        k_cache, v_cache, k, v, slots,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        heads, dim,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
    )  # fmt: skip
    return None
