"""What decode and prefill attention share: the PyTorch attention both references reduce to, and the
Triton online softmax both kernels run: `attend_init` the running state, `attend_block` once per
block of context tokens, `attend_result` to normalize. Scores are kept in base 2 (exp2, log2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, tl


def attend_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """q [n, Hq, D], k [S, Hk, D], v [S, Hk, Dv] float32, mask [n, S] (True: visible) -> [n, Hq, Dv]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,shd->hns", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hns,shd->nhd", scores.softmax(dim=-1), v)


@jit
def attend_init(M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The running state of M queries before any context: m_i = -inf, l_i = 0, acc [M, BLOCK_DV] = 0."""
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    return m_i, tl.zeros([M], dtype=tl.float32), tl.zeros([M, BLOCK_DV], dtype=tl.float32)


@jit
def attend_block(
    q,  # [M, BLOCK_D] the queries, zero past HEAD_DIM
    m_i,  # [M] float32 running maximum of the base-2 scores
    l_i,  # [M] float32 running sum of exp2(score - m_i)
    acc,  # [M, BLOCK_DV] float32 running sum of exp2(score - m_i) * v
    offs_n,  # [BLOCK_N] context positions of this block
    end,  # positions >= end are not loaded
    limit,  # positions >= limit score -inf: a scalar, or [M, 1] for a limit per query (causal)
    REQ_ROW,  # the request's row of REQ_TO_TOKEN: cache row of each context position
    K_HEAD,  # K_CACHE at this kv head
    V_HEAD,  # V_CACHE at this kv head
    stride_k_s,  # K_CACHE row stride
    stride_v_s,  # V_CACHE row stride
    offs_d,  # [BLOCK_D] q/k head-dim offsets
    mask_d,  # [BLOCK_D] offs_d < HEAD_DIM
    offs_dv,  # [BLOCK_DV] v head-dim offsets (offs_d again where v has the q/k head dim)
    mask_dv,  # [BLOCK_DV] offs_dv < the v head dim
    qk_scale,  # softmax scale * log2(e)
    MASKED: tl.constexpr,  # apply `limit`; False only where every query sees the whole block
    PRECISION: tl.constexpr,  # tl.dot input precision
):  # fmt: skip
    mask_n = offs_n < end
    rows = tl.load(REQ_ROW + offs_n, mask=mask_n, other=0).to(tl.int64)
    return attend_rows(
        q, m_i, l_i, acc, rows, mask_n, offs_n, limit, K_HEAD, V_HEAD, stride_k_s, stride_v_s, offs_d,
        mask_d, offs_dv, mask_dv, qk_scale, MASKED=MASKED, PRECISION=PRECISION,
    )  # fmt: skip


@jit
def attend_rows(
    q, m_i, l_i, acc,  # as attend_block's
    rows,  # [BLOCK_N] int64 rows of K_HEAD / V_HEAD holding this block's keys and values
    mask_n,  # [BLOCK_N] which of them to load (the others score as 0 unless MASKED excludes them)
    offs_n, limit, K_HEAD, V_HEAD, stride_k_s, stride_v_s, offs_d, mask_d, offs_dv, mask_dv, qk_scale,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """attend_block's body, for keys and values found by row: through the request's cache rows
    (attend_block), or at contiguous rows (a step's new tokens, prefill_attention's NEW_KV): the
    rows' masked loads, then `attend_kv`."""
    k = tl.load(
        K_HEAD + rows[:, None] * stride_k_s + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )
    v_mask = mask_n[:, None] & mask_dv[None, :]
    v = tl.load(V_HEAD + rows[:, None] * stride_v_s + offs_dv[None, :], mask=v_mask, other=0.0)
    return attend_kv(q, m_i, l_i, acc, k, v, qk_scale, limit, offs_n, MASKED=MASKED, PRECISION=PRECISION)


@jit
def attend_tile(q, m_i, l_i, acc, K_PTRS, V_PTRS, mask_d, mask_dv, qk_scale, limit, offs_n,
                MASKED: tl.constexpr, FULL_D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """attend_rows for a whole block of keys and values at given pointers ([BLOCK_N, BLOCK_D] and
    [BLOCK_N, BLOCK_DV]), every row there to be read: loads with no row mask, none at all where the
    head dims fill the block (FULL_D); then `attend_kv`."""
    if FULL_D:  # noqa: SIM108 (a constexpr branch, folded by Triton)
        k = tl.load(K_PTRS)
        v = tl.load(V_PTRS)
    else:
        k = tl.load(K_PTRS, mask=mask_d[None, :], other=0.0)
        v = tl.load(V_PTRS, mask=mask_dv[None, :], other=0.0)
    return attend_kv(q, m_i, l_i, acc, k, v, qk_scale, limit, offs_n, MASKED=MASKED, PRECISION=PRECISION)


@jit
def attend_kv(q, m_i, l_i, acc, k, v, qk_scale, limit, offs_n, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One block of loaded keys k [BLOCK_N, BLOCK_D] and values v [BLOCK_N, BLOCK_DV] into the running
    state, the scale applied with the maximum's subtraction (one fused multiply-add per score).
    MASKED: positions offs_n >= limit ([M, 1]) score -inf. Keys and values of another dtype than
    q's (an fp8 KV cache) are widened to it first: nothing where they share it."""
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [M, BLOCK_N], unscaled
    if MASKED:
        s = tl.where(offs_n[None, :] < limit, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@jit
def attend_result(m_i, l_i, acc):
    """(out [M, BLOCK_DV], lse [M]): the normalized output and the log2-sum-exp2 of the scores;
    a query that saw no context gets zeros and lse = -inf."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
