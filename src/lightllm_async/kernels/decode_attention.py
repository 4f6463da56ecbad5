"""Decode attention over the token-level KV cache: one new query token per request, GQA,
flash-decoding (the context is split into chunks, then a second stage merges the chunks; where the
batch alone fills the card, one chunk holds the whole context and writes the output itself)."""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .attention_block import attend_block, attend_init, attend_ref, attend_result
from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_cpu_path, use_triton


def decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    # reads every request's K and V rows once: sum(seq_lens) * Hk * D * 2 * itemsize, plus q and out
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        seq_len = int(seq_lens[b])
        if seq_len == 0:
            continue
        rows = req_to_token[int(req_idx[b]), :seq_len].long()
        k, v = k_cache[rows].float(), v_cache[rows].float()
        out[b] = attend_ref(q[b : b + 1].float(), k, v, scale, None)[0].to(q.dtype)
    return out


def decode_attention_cpu(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    """The CPU path: per request, its rows gathered with index_select (advanced indexing is ~4x
    slower at these sizes) and torch's SDPA in float32, as the reference computes (SDPA in
    bfloat16 rounds the probabilities before they weight v, which flipped a near-tie greedy
    token of the parity prompts). GQA without repeating the keys: the group's query heads are
    the query rows of their kv head, [1, Hk, group, D] against [1, Hk, S, D]; one query token
    sees every key, so there is no mask. ~10x fewer microseconds than the reference here."""
    batch, hq, dim = q.shape
    hk = k_cache.shape[1]
    out = torch.zeros_like(q)
    for b, (row, seq_len) in enumerate(zip(req_idx.tolist(), seq_lens.tolist(), strict=True)):
        if seq_len == 0:
            continue
        rows = req_to_token[row, :seq_len]  # int32: index_select takes it as it is
        k = k_cache.index_select(0, rows).transpose(0, 1)[None]  # [1, Hk, S, D]
        v = v_cache.index_select(0, rows).transpose(0, 1)[None]
        qb = q[b].view(1, hk, hq // hk, dim).float()
        o = torch.nn.functional.scaled_dot_product_attention(qb, k.float(), v.float(), scale=scale)
        out[b] = o.view(hq, dim)  # [1, Hk, group, D] -> [Hq, D], rounded to q's dtype once
    return out


def decode_attention_rows(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """Decode attention over contexts given as cache rows: q [B, Hq, D], rows [B, L] (int64,
    padded past a context's length with rows of its own, so that every key read is finite),
    mask [B, 1, 1, L] (True: the context's own row) or None when no row is padding; -> [B, Hq, D].

    One batched SDPA in float32 with no host value, which is what a compiled CPU decode step
    needs (runner/cpu_step.py); the GQA group as query rows, as in `decode_attention_cpu`.
    Every context must hold at least one token."""
    batch, hq, dim = q.shape
    hk = k_cache.shape[1]
    flat = rows.flatten()  # index_select: ~4x faster than indexing with a [B, L] tensor
    k = k_cache.index_select(0, flat).view(*rows.shape, hk, dim).transpose(1, 2).float()  # [B, Hk, L, D]
    v = v_cache.index_select(0, flat).view(*rows.shape, hk, dim).transpose(1, 2).float()
    o = torch.nn.functional.scaled_dot_product_attention(
        q.view(batch, hk, hq // hk, dim).float(), k, v, attn_mask=mask, scale=scale
    )  # [B, Hk, group, D]
    return o.reshape(batch, hq, dim).to(q.dtype)


@jit(do_not_specialize_on_alignment=["REQ_IDX", "SEQ_LENS", "ORDER"])  # may be slices (prefill_attention.py)
def _decode_split_kernel(
    Q,  # [B, Hq, D] one query token per request
    K_CACHE,  # [S, Hk, D] key cache, one row per token
    V_CACHE,  # [S, Hk, D] value cache
    REQ_TO_TOKEN,  # [R, L] cache rows of each request, in position order
    REQ_IDX,  # [B] row of REQ_TO_TOKEN of each request
    SEQ_LENS,  # [B] context length of each request, the new token included
    ORDER,  # [B] int32 (HAS_ORDER): the request each request-slot of the grid takes, longest first
    MID_O,  # [B, Hq, NUM_SPLITS, D] float32: each split's normalized output
    MID_LSE,  # [B, Hq, NUM_SPLITS] float32: each split's log2-sum-exp2 of scores (-inf: empty)
    OUT,  # [B, Hq, D] the output, written here when DIRECT (one split: nothing to merge)
    stride_q_b, stride_q_h,  # Q strides; the head dim is contiguous
    stride_k_s, stride_k_h,  # K_CACHE strides
    stride_v_s, stride_v_h,  # V_CACHE strides
    stride_r2t,  # REQ_TO_TOKEN row stride
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides (the split dim is contiguous)
    stride_o_b, stride_o_h,  # OUT strides
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # D
    NUM_SPLITS: tl.constexpr,  # chunks the context is cut into
    DIRECT: tl.constexpr,  # NUM_SPLITS == 1: write OUT instead of MID_O / MID_LSE
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for float32 tensors)
    BLOCK_G: tl.constexpr,  # >= GROUP, >= 16: the query heads of one kv head, one tl.dot tile
    BLOCK_N: tl.constexpr,  # context tokens per iteration
    BLOCK_D: tl.constexpr,  # >= HEAD_DIM, a power of two
    QK_F16: tl.constexpr,  # the queries as float16, so that a float8 cache widens to float16
    HAS_ORDER: tl.constexpr,  # ORDER given: request-slot i of the grid is request ORDER[i]
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program: one request, one kv head with all its query heads, one chunk of the context
    if HAS_ORDER:  # the grid is (kv heads, chunks, requests), the requests longest first: all the
        # programs of the longest contexts start first and the shortest end the grid (a short tail)
        kv_head = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.load(ORDER + tl.program_id(2))
    else:
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

    # -- this program's chunk: whole blocks of BLOCK_N tokens --
    seq_len = tl.load(SEQ_LENS + b)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # -- the group's queries --
    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if QK_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    # -- online softmax over the chunk --
    m_i, l_i, acc = attend_init(BLOCK_G, BLOCK_D)
    req_row = REQ_TO_TOKEN + req * stride_r2t
    k_head, v_head = K_CACHE + kv_head * stride_k_h, V_CACHE + kv_head * stride_v_h
    for n in range(start, end, BLOCK_N):
        m_i, l_i, acc = attend_block(
            q, m_i, l_i, acc, n + tl.arange(0, BLOCK_N), end, end, req_row, k_head, v_head,
            stride_k_s, stride_v_s, offs_d, mask_d, offs_d, mask_d, qk_scale, MASKED=True,
            PRECISION=PRECISION,
        )  # fmt: skip

    # -- the chunk's result; an empty chunk writes zeros and lse = -inf, which the merge ignores --
    out, lse = attend_result(m_i, l_i, acc)
    if DIRECT:
        o_ptrs = OUT + b * stride_o_b + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        mo_ptrs = MID_O + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
        tl.store(mo_ptrs + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(MID_LSE + b * stride_ml_b + heads * stride_ml_h + split, lse, mask=mask_g)


@jit
def _decode_merge_kernel(
    MID_O,  # [B, Hq, NUM_SPLITS, D] float32, from _decode_split_kernel
    MID_LSE,  # [B, Hq, NUM_SPLITS] float32, from _decode_split_kernel
    OUT,  # [B, Hq, D] attention output
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides
    stride_o_b, stride_o_h,  # OUT strides
    HEAD_DIM: tl.constexpr,  # D
    NUM_SPLITS: tl.constexpr,  # any count >= 1
    BLOCK_S: tl.constexpr,  # >= NUM_SPLITS, a power of two
    BLOCK_D: tl.constexpr,  # >= HEAD_DIM, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program: one request, one query head
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # -- weight each split by its share of the total exp-sum --
    lse = tl.load(MID_LSE + b * stride_ml_b + head * stride_ml_h + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # all empty (seq_len 0): w = 0
    mo_ptrs = MID_O + b * stride_mo_b + head * stride_mo_h + offs_s[:, None] * stride_mo_s
    o = tl.load(mo_ptrs + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    denom = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b * stride_o_b + head * stride_o_h + offs_d, out.to(OUT.dtype.element_ty), mask=mask_d)


# The split kernel's launch by the cache's element size, timed at Llama-3-8B heads on an H200 with
# perf/fp8_decode_bench.py --sweep-bf16 (2026-11-30), at batch x context 256 x 640, 64 x 4096
# and 1 x 4096. 16-bit: 2 warps x 64 tokens x 3 stages took 0.95-0.97x the time of the 4 x 64 x 2
# measured on an H100 before (82-93% of the copy rate there; others within 5%). A float8 cache:
# q and the widened blocks meet in float16 (one hardware conversion per pair; as fast as
# bfloat16 or faster), 2 warps x 128 tokens x 2 stages took 0.62-0.70x the bfloat16 cache's
# time at the two large shapes (two calls) (62-75% of the copy rate; still short of the 0.5x that half the
# bytes allows), where last session's untimed 8 warps x 64 took 0.99-1.15x; 4 and 8 warps,
# 256-token blocks and 5 stages were slower. Triton 3.9 compiles that launch with a 664-byte spill
# (perf/sm90_compile_check.py fp8; 8 x 64 does not spill); the card's Triton 3.6 compiles it at 255
# registers with none (checked 2026-12-01), and there it timed fastest.
LAUNCH = {
    1: {"f16": True, "warps": 2, "block_n": 128, "stages": 2},
    2: {"f16": False, "warps": 2, "block_n": 64, "stages": 3},
    4: {"f16": False, "warps": 4, "block_n": 64, "stages": 2},  # float32: the tests' reference dtype
}


# One chunk per context (batch x kv heads fill the card: batch >= 34 at 8 kv heads on 132 SMs): the
# split kernel writes the output itself and the merge launch is skipped. LLA_DECODE_DIRECT=0 keeps
# the merge (benchmarks compare the two in separate processes).
DIRECT_ONE_SPLIT = os.environ.get("LLA_DECODE_DIRECT", "1") != "0"
# LLA_DECODE_ORDER=0: an `order` is ignored, the grid as without one (benchmarks compare the two
# in separate processes)
USE_ORDER = os.environ.get("LLA_DECODE_ORDER", "1") != "0"


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Chunks per context: about four programs per SM (two resident at a time), rounded down, at
    most 32. Timed on an H200 against every count from 1 to 32 (perf/decode_splits_bench.py, 17
    shapes from 1 x 4096 to 256 x 640, 2026-11-30): the best or within 1% of it at each; the
    power of two above, chosen before, cut up to 2x the chunks needed (at batch 50: 2 where 1 is
    5% faster, at batch 8: 16 where 8 is 19% faster). A function of the shapes only, never of
    seq_lens, so that the launch is the same in a CUDA graph."""
    if device.type != "cuda":
        return 4  # the interpreter: small contexts still cut into several chunks and merged
    return max(1, min(32, 4 * _num_sms(device) // (batch * kv_heads)))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    seq_lens: Tensor,
    scale: float,
    num_splits: int | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Attention of each request's one new token over its whole context in the cache.

    q [B, Hq, D]; k_cache, v_cache [S, Hk, D] with Hq a multiple of Hk; req_to_token [R, L] int32
    holds each request's cache rows in position order; request b is row req_idx[b] (int32) and has
    seq_lens[b] (int32) tokens, the new one included (store_kv it first). Returns [B, Hq, D];
    a request with seq_len 0 gets zeros. num_splits (any count >= 1) overrides the heuristic.
    `order` [B] int32 (the runner's, longest context first): the programs take the requests in
    that order, all of a request's together; the result is the same.
    """
    if not use_triton(q):
        fallback = decode_attention_cpu if use_cpu_path(q) else decode_attention_ref
        return fallback(q, k_cache, v_cache, req_to_token, req_idx, seq_lens, scale)
    batch, hq, dim = q.shape
    hk = k_cache.shape[1]
    assert k_cache.shape[2] == dim and v_cache.shape == k_cache.shape and hq % hk == 0
    assert req_idx.shape == (batch,) and seq_lens.shape == (batch,) and req_to_token.stride(1) == 1
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    assert order is None or (order.shape == (batch,) and order.dtype == torch.int32), "order: [B] int32"
    order = order if USE_ORDER and batch > 1 else None  # one request: nothing to order, a load saved
    out = torch.empty((batch, hq, dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    splits = num_splits or _num_splits(batch, hk, q.device)
    assert splits >= 1, f"num_splits {splits}"
    direct = splits == 1 and DIRECT_ONE_SPLIT  # one chunk writes `out`: the float32 buffers unused
    mid_shape = (batch, hq, splits) if not direct else (1, 1, 1)
    mid_o = torch.empty((*mid_shape, dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(mid_shape, dtype=torch.float32, device=q.device)
    group, block_d = hq // hk, triton.next_power_of_2(dim)
    launch = LAUNCH[k_cache.element_size()]
    grid = (batch, hk, splits) if order is None else (hk, splits, batch)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, req_to_token, req_idx, seq_lens, seq_lens if order is None else order,
        mid_o, mid_lse, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), scale * math.log2(math.e),
        GROUP=group, HEAD_DIM=dim, NUM_SPLITS=splits, DIRECT=direct,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=launch["block_n"] if q.is_cuda else 16,
        BLOCK_D=block_d, QK_F16=launch["f16"] and q.dtype == torch.bfloat16, HAS_ORDER=order is not None,
        num_warps=launch["warps"], num_stages=launch["stages"], **pdl_launch(q),
    )  # fmt: skip
    if direct:
        return out
    _decode_merge_kernel[(batch, hq)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=dim, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        **pdl_launch(q), num_warps=4,
    )  # fmt: skip
    return out
