"""MLA decode attention (DeepSeek-V2/V3) over the token-level latent cache: one new query token per
request, the no-rope query already absorbed through W_UK, so that every head attends directly over
the one shared latent "KV head" (c_kv, also the value) plus the rope key. Flash-decoding: the context
is cut into chunks, then a second stage merges them, so that small batches still fill the card; a
short context fills fewer chunks (at least one block of tokens each, `min_split`), and the merge
reads only those. (A fused merge, by the last chunk of a request to finish, measured 2x slower at
batch 1-16 on an H200: one program then reads every chunk's partial serially; perf/RESULTS.md.)"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton


def mla_decode_attention_ref(
    q_nope: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    # reads every request's latent + rope rows once: sum(seq_lens) * (R + P) * itemsize, plus the
    # queries and the output; the heads share those rows, which is what makes MLA decode cheap
    rank = q_nope.shape[-1]
    out = torch.zeros_like(q_nope)
    for b in range(q_nope.shape[0]):
        seq_len = int(seq_lens[b])
        if seq_len == 0:
            continue
        rows = req_to_token[int(req_idx[b]), :seq_len].long()
        kv = kv_cache[rows].float()  # [n, R + P]
        c_kv, k_pe = kv[:, :rank], kv[:, rank:]
        scores = (q_nope[b].float() @ c_kv.T + q_pe[b].float() @ k_pe.T) * scale  # [H, n]
        out[b] = (scores.softmax(dim=-1) @ c_kv).to(q_nope.dtype)
    return out


@jit
def _chunking(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """(tokens a chunk holds, chunks the context reaches): the context cut into at most num_splits
    chunks of whole BLOCK_N blocks, each at least MIN_SPLIT tokens."""
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    return split_len, tl.minimum(tl.cdiv(seq_len, split_len), num_splits)


def lengths_spread(longest: int, total: int, count: int) -> bool:
    """Whether a decode step's contexts spread (the longest over 1.2x the mean of `count`
    contexts of `total` tokens): where they do, an ordered launch uses its doubled cut. Equal
    lengths fill the card in one wave of the plain cut; spread lengths make the longest contexts'
    chunks that wave's tail, and twice as many shorter chunks, the longest first, let the short
    ones fill in behind them. On an H200 the doubled cut cost 0-10% where lengths were equal (its
    partials' traffic; 15-23% at 1k contexts) and saved 1-32% at lengths spread +-25-90%
    (perf/RESULTS.md, 2026-12-01). The runner decides it on the host, where the lengths are, and
    hands the kernel the answer (`spread`)."""
    return longest * count * 5 > total * 6


@jit(do_not_specialize_on_alignment=["REQ_IDX", "SEQ_LENS", "ORDER"])  # may be slices (prefill_attention.py)
def _mla_decode_split_kernel(
    Q_NOPE,  # [B, H, R] absorbed no-rope queries (q_nope @ W_UK per head)
    Q_PE,  # [B, H, P] rope queries
    KV_CACHE,  # [S, R + P] per token: the latent c_kv (also the value), then the rope key k_pe
    REQ_TO_TOKEN,  # [R2T, L] cache rows of each request, in position order
    REQ_IDX,  # [B] row of REQ_TO_TOKEN of each request
    SEQ_LENS,  # [B] context length of each request, the new token included
    ORDER,  # [B] int32 (HAS_ORDER): the request each request-slot of the grid takes, longest first
    SPREAD,  # [1] int32 (ADAPT): nonzero where the contexts spread (lengths_spread)
    MID_O,  # [B, H, NUM_SPLITS, R] float32: each chunk's normalized output (unused if DIRECT)
    MID_LSE,  # [B, H, NUM_SPLITS] float32: each chunk's log2-sum-exp2 (-inf: empty; unused if DIRECT)
    OUT,  # [B, H, R] the output, written here when DIRECT (one chunk: nothing to merge)
    stride_qn_b, stride_qn_h,  # Q_NOPE strides; the last dim is contiguous
    stride_qp_b, stride_qp_h,  # Q_PE strides
    stride_kv,  # KV_CACHE row stride
    stride_r2t,  # REQ_TO_TOKEN row stride
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides (the split dim is contiguous)
    stride_o_b, stride_o_h,  # OUT strides
    num_heads,  # H
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    KV_LORA_RANK: tl.constexpr,  # R: latent width, the first R values of a cache row
    ROPE_DIM: tl.constexpr,  # P: rope key width, the P values after them
    NUM_SPLITS: tl.constexpr,  # chunks the context is cut into, at most
    MIN_SPLIT: tl.constexpr,  # tokens a chunk holds at least (a multiple of BLOCK_N): a short
    # context is cut into fewer chunks, and the programs of chunks past its end write an empty lse
    DIRECT: tl.constexpr,  # NUM_SPLITS == 1: write OUT instead of MID_O / MID_LSE
    HAS_ORDER: tl.constexpr,  # ORDER given: request-slot i of the grid is request ORDER[i]
    ADAPT: tl.constexpr,  # cut every context into NUM_SPLITS / 2 chunks unless SPREAD says the
    # lengths spread; the merge reads every chunk's lse, so it need not know which. With
    # NUM_SPLITS == 2 that is one chunk, whose result goes to OUT directly: the merge then exits
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for float32 tensors)
    BLOCK_H: tl.constexpr,  # heads per program, >= 16 (one tl.dot tile)
    BLOCK_N: tl.constexpr,  # context tokens per iteration
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    BLOCK_P: tl.constexpr,  # >= P, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program: BLOCK_H heads of one request, one chunk of its context. The head blocks of a chunk
    # are neighbours on axis 0, so they run together and the later ones read the latent from L2.
    split = tl.program_id(1)
    b = tl.program_id(2)
    if HAS_ORDER:  # the longest contexts' chunks start first: the short ones fill the gaps later
        b = tl.load(ORDER + b)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)

    # -- this program's chunk: whole blocks of BLOCK_N tokens --
    seq_len = tl.load(SEQ_LENS + b)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    # (a flag from the host: the lengths reduced here cost ~30 registers a thread)
    splits = tl.where(tl.load(SPREAD) != 0, NUM_SPLITS, NUM_SPLITS // 2) if ADAPT else NUM_SPLITS
    split_len, used = _chunking(seq_len, splits, BLOCK_N, MIN_SPLIT)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if not DIRECT and split >= tl.maximum(used, 1):  # past the context: an empty chunk for the merge
        lse_ptrs = MID_LSE + b * stride_ml_b + heads * stride_ml_h + split
        tl.store(lse_ptrs, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=heads < num_heads)
        return

    # -- the heads' queries, loaded once --
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = heads < num_heads
    mask_r = offs_r < KV_LORA_RANK
    mask_p = offs_p < ROPE_DIM
    qn_ptrs = Q_NOPE + b * stride_qn_b + heads[:, None] * stride_qn_h + offs_r[None, :]
    q_nope = tl.load(qn_ptrs, mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    qp_ptrs = Q_PE + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_p[None, :]
    q_pe = tl.load(qp_ptrs, mask=mask_h[:, None] & mask_p[None, :], other=0.0)

    # -- online softmax over the chunk; each latent tile serves as key and as value --
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        rows = tl.load(REQ_TO_TOKEN + req * stride_r2t + offs_n, mask=mask_n, other=0).to(tl.int64)
        row_ptrs = KV_CACHE + rows[:, None] * stride_kv
        c_kv = tl.load(row_ptrs + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        k_pe = tl.load(
            row_ptrs + KV_LORA_RANK + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0
        )
        s = tl.dot(q_nope, tl.trans(c_kv), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
        m_i = m_new

    # -- the chunk's result; an empty chunk gives zeros and lse = -inf, which the merge ignores --
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    mask_out = mask_h[:, None] & mask_r[None, :]
    o_ptrs = OUT + b * stride_o_b + heads[:, None] * stride_o_h + offs_r[None, :]
    one = DIRECT
    if ADAPT and NUM_SPLITS == 2:  # one chunk unless the lengths spread: then nothing to merge
        one = splits == 1
    if one:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_out)
    else:
        lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        mo_ptrs = MID_O + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
        tl.store(mo_ptrs + offs_r[None, :], out, mask=mask_out)
        lse_ptrs = MID_LSE + b * stride_ml_b + heads * stride_ml_h
        tl.store(lse_ptrs + split, lse, mask=mask_h)


@jit
def _mla_decode_merge_kernel(
    MID_O,  # [B, H, NUM_SPLITS, R] float32, from _mla_decode_split_kernel
    MID_LSE,  # [B, H, NUM_SPLITS] float32, from _mla_decode_split_kernel (-inf: an empty chunk)
    OUT,  # [B, H, R] attention output
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides
    stride_o_b, stride_o_h,  # OUT strides
    KV_LORA_RANK: tl.constexpr,  # R
    NUM_SPLITS: tl.constexpr,  # any count >= 1
    BLOCK_S: tl.constexpr,  # >= NUM_SPLITS, a power of two
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program: one head of one request
    head = tl.program_id(0)
    b = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    out = _merged_row(
        MID_O, MID_LSE, b, head, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
        NUM_SPLITS, BLOCK_S, BLOCK_R, KV_LORA_RANK,
    )  # fmt: skip
    o_ptrs = OUT + b * stride_o_b + head * stride_o_h + offs_r
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_r < KV_LORA_RANK)


@jit
def _mla_decode_merge_pair_kernel(
    MID_O,  # [B, H, 2, R] float32, from _mla_decode_split_kernel (a one-chunk cut doubled)
    MID_LSE,  # [B, H, 2] float32 (-inf: an empty chunk, whose output is not read)
    SPREAD,  # [1] int32: 0 where the split kernel wrote OUT itself (then this exits)
    OUT,  # [B, H, R] attention output
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides (the split dim is contiguous)
    stride_o_b, stride_o_h,  # OUT strides
    num_heads,  # H
    KV_LORA_RANK: tl.constexpr,  # R
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    if tl.load(SPREAD) == 0:  # (after the wait: this grid ends only once the split kernel has)
        return
    # one program: BLOCK_H heads of one request, both chunks at once (a few programs a request,
    # where one a head is many more to start for nothing when the flag is 0)
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = heads < num_heads
    lse_ptrs = MID_LSE + b * stride_ml_b + heads * stride_ml_h
    lse0 = tl.load(lse_ptrs, mask=mask_h, other=float("-inf"))
    lse1 = tl.load(lse_ptrs + 1, mask=mask_h, other=float("-inf"))
    m = tl.maximum(lse0, lse1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w0, w1 = tl.math.exp2(lse0 - m), tl.math.exp2(lse1 - m)
    mask = mask_h[:, None] & (offs_r < KV_LORA_RANK)[None, :]
    mo_ptrs = MID_O + b * stride_mo_b + heads[:, None] * stride_mo_h + offs_r[None, :]
    o0 = tl.load(mo_ptrs, mask=mask & (lse0 > float("-inf"))[:, None], other=0.0)
    o1 = tl.load(mo_ptrs + stride_mo_s, mask=mask & (lse1 > float("-inf"))[:, None], other=0.0)
    denom = w0 + w1
    out = (w0[:, None] * o0 + w1[:, None] * o1) / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = OUT + b * stride_o_b + heads[:, None] * stride_o_h + offs_r[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask)


@jit
def _merged_row(
    MID_O, MID_LSE, b, head,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, KV_LORA_RANK: tl.constexpr,
):  # fmt: skip
    """[BLOCK_R] float32: head `head` of request b, its chunks' outputs weighed by their shares of
    the total exp-sum. Every chunk has an lse (-inf: empty, past its context; its output is not
    read); all empty gives zeros."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < KV_LORA_RANK
    lse_ptrs = MID_LSE + b * stride_ml_b + head * stride_ml_h
    lse = tl.load(lse_ptrs + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.math.exp2(lse - m), axis=0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    mo_ptrs = MID_O + b * stride_mo_b + head * stride_mo_h + offs_r
    for s in range(NUM_SPLITS):  # one row at a time: [NUM_SPLITS, R] at once would spill
        lse_s = tl.load(lse_ptrs + s)
        if lse_s > float("-inf"):
            acc += tl.math.exp2(lse_s - m) * tl.load(mo_ptrs + s * stride_mo_s, mask=mask_r, other=0.0)
    return acc / tl.where(denom > 0, denom, 1.0)


@jit
def _mla_decode_merge_uv_kernel(
    MID_O,  # [B, H, NUM_SPLITS, R] float32, from _mla_decode_split_kernel
    MID_LSE,  # [B, H, NUM_SPLITS] float32, from _mla_decode_split_kernel (-inf: an empty chunk)
    W_UV,  # [H, R, V] W_UV transposed: a head's latent -> its value dims (a layer's weight)
    OUT,  # [B, H, V] the attention output in the value space
    stride_mo_b, stride_mo_h, stride_mo_s,  # MID_O strides
    stride_ml_b, stride_ml_h,  # MID_LSE strides
    stride_w_h, stride_w_r,  # W_UV strides; V is contiguous
    stride_o_b, stride_o_h,  # OUT strides; V is contiguous
    KV_LORA_RANK: tl.constexpr,  # R
    V_DIM: tl.constexpr,  # V
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= NUM_SPLITS, a power of two
    BLOCK_R: tl.constexpr,  # >= R, a power of two
    BLOCK_V: tl.constexpr,  # value dims per program
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch): W_UV read before gdc_wait
):  # fmt: skip
    # one program: BLOCK_V value dims of one head of one request. It merges the head's chunks (the
    # programs of a head repeat that from L2, a few KB) and multiplies the merged latent by its
    # slice of W_UV: the per-head product a separate batched GEMM would launch for
    head = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    b = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    mask_v = offs_v < V_DIM
    w_ptrs = W_UV + head * stride_w_h + offs_r[:, None] * stride_w_r + offs_v[None, :]
    w = tl.load(w_ptrs, mask=(offs_r < KV_LORA_RANK)[:, None] & mask_v[None, :], other=0.0)
    pdl_wait(PDL)  # the weight is the layer's: read before the split kernel's outputs are waited for
    o = _merged_row(
        MID_O, MID_LSE, b, head, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
        NUM_SPLITS, BLOCK_S, BLOCK_R, KV_LORA_RANK,
    )  # fmt: skip
    out = tl.sum(o[:, None] * w.to(tl.float32), axis=0)  # [BLOCK_V]
    tl.store(OUT + b * stride_o_b + head * stride_o_h + offs_v, out.to(OUT.dtype.element_ty), mask=mask_v)


@jit(do_not_specialize=["num_rows"])
def _mla_absorb_q_kernel(
    Q,  # [B, H, D] the no-rope queries, D contiguous
    W_UK,  # [H, D, R] W_UK: a head's no-rope dims -> the latent (a layer's weight)
    OUT,  # [B, H, R] the absorbed queries
    num_rows,  # B
    stride_q_b, stride_q_h,
    stride_w_h, stride_w_d,  # W_UK strides; R is contiguous
    stride_o_b, stride_o_h,
    D: tl.constexpr,
    R: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee": float32 products (float32 tensors, and the interpreter)
    PDL: tl.constexpr,  # launched with launch_pdl: W_UK read before gdc_wait
    BLOCK_B: tl.constexpr,  # rows per tile, >= 16
    BLOCK_D: tl.constexpr,  # >= D, a power of two
    BLOCK_R: tl.constexpr,  # latent dims per program
):  # fmt: skip
    # one program: BLOCK_R latent dims of one head, for every row; its W_UK slice read once
    head = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_b = tl.arange(0, BLOCK_B)
    mask_r, mask_d = offs_r < R, offs_d < D
    w_ptrs = W_UK + head * stride_w_h + offs_d[:, None] * stride_w_d + offs_r[None, :]
    w = tl.load(w_ptrs, mask=mask_d[:, None] & mask_r[None, :], other=0.0)
    if PRECISION == "ieee":  # float32, or the interpreter (whose 16-bit tl.dot is wrong)
        w = w.to(tl.float32)
    pdl_wait(PDL)
    for b0 in range(0, num_rows, BLOCK_B):
        rows = b0 + offs_b
        mask_b = rows < num_rows
        q = tl.load(
            Q + rows[:, None] * stride_q_b + head * stride_q_h + offs_d[None, :],
            mask=mask_b[:, None] & mask_d[None, :], other=0.0,
        )  # fmt: skip
        if PRECISION == "ieee":
            q = q.to(tl.float32)
        acc = tl.dot(q, w, input_precision=PRECISION)  # [BLOCK_B, BLOCK_R]
        o_ptrs = OUT + rows[:, None] * stride_o_b + head * stride_o_h + offs_r[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_b[:, None] & mask_r[None, :])


def mla_absorb_q_ref(q_nope: Tensor, w_uk: Tensor) -> Tensor:
    # reads W_UK once (H * D * R * itemsize) and the few queries; float32 products
    return torch.einsum("bhd,hdr->bhr", q_nope.float(), w_uk.float()).to(q_nope.dtype)


def mla_absorb_q(q_nope: Tensor, w_uk: Tensor) -> Tensor:
    """The absorbed no-rope queries of decode: q_nope [B, H, D] (strided rows allowed) times each
    head's W_UK [H, D, R] -> [B, H, R] contiguous, products summed in float32. For the few rows of
    small-batch decode (one Triton launch that, under programmatic dependent launch, reads its W_UK
    slice while the kernel before it finishes); the weight must be constant (a layer's)."""
    if not use_triton(q_nope):
        return mla_absorb_q_ref(q_nope, w_uk)
    batch, heads, dim = q_nope.shape
    rank = w_uk.shape[2]
    assert w_uk.shape == (heads, dim, rank) and w_uk.stride(2) == 1 and q_nope.stride(2) == 1
    assert q_nope.dtype == w_uk.dtype, "queries and W_UK must share a dtype"
    out = torch.empty((batch, heads, rank), dtype=q_nope.dtype, device=q_nope.device)
    if batch == 0:
        return out
    block_r = 64 if q_nope.is_cuda else 32
    _mla_absorb_q_kernel[(heads, triton.cdiv(rank, block_r))](
        q_nope, w_uk, out, batch, q_nope.stride(0), q_nope.stride(1), w_uk.stride(0), w_uk.stride(1),
        out.stride(0), out.stride(1), D=dim, R=rank,
        PRECISION="ieee" if q_nope.dtype == torch.float32 or not q_nope.is_cuda else "tf32",
        BLOCK_B=16, BLOCK_D=triton.next_power_of_2(dim), BLOCK_R=block_r, num_warps=4,
        **pdl_launch(q_nope),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class _Launch:
    block_h: int  # heads per program
    block_n: int  # tokens per iteration
    num_warps: int
    num_stages: int
    per_sm: int  # programs that fit on one multiprocessor at once
    waves: int  # waves of programs the context split aims at (more: more merge traffic)
    min_split: int = 0  # tokens a chunk holds at least (rounded up to block_n; 0: one block)
    one_chunk_order: bool = False  # given an order, a one-chunk cut is doubled as a few chunks are


# Chosen by `perf/mla_moe_bench.py --only mla --sweep` on an H200 (2026-11-29, perf/RESULTS.md).
# Up to 16 heads (V2-Lite): a [16, 512] float32 accumulator and two stages of [64, 576] tiles (94
# KB of shared memory and, on sm_90a, 234-254 registers a thread under the card's Triton 3.6, 200
# under 3.9: two programs fit on an SM, so the two "waves" the context is cut for run at once):
# 71-86% of the copy rate at batch 64-128 and 4k-8k contexts. More heads (V3's 128): 64 heads per
# program, 8 warps, so that the products are 64-row wgmma tiles and each latent tile serves 64
# heads: 3.3x the 32-head launch, ~235 TFLOP/s; bound by the tensor cores, and its merge traffic
# ([B, H, splits, 512] float32) costs more than a second wave gains, so it splits only when the
# batch leaves the card mostly idle.
_LAUNCH_FEW_HEADS = _Launch(16, 64, 4, 2, per_sm=1, waves=2, one_chunk_order=True)
_LAUNCH_MANY_HEADS = _Launch(64, 64, 8, 2, per_sm=1, waves=1)
_LAUNCH_INTERPRETER = _Launch(16, 16, 4, 1, per_sm=1, waves=1, one_chunk_order=True)


def _env_overrides() -> dict:
    """LLA_MLA_MIN_SPLIT (tokens) and LLA_MLA_LAUNCH ("heads per program,tokens per iteration,
    warps,stages"): the CUDA launch's defaults replaced, for benchmarks that compare them in
    separate processes (perf/RESULTS.md)."""
    out = {}
    if value := os.environ.get("LLA_MLA_MIN_SPLIT"):
        out["min_split"] = int(value)
    if value := os.environ.get("LLA_MLA_LAUNCH"):
        block_h, block_n, warps, stages = (int(v) for v in value.split(","))
        out.update(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
    return out


_ENV = _env_overrides()
# With an `order`, a launch cut 2-8 chunks a context (or one, at few heads) holds twice as many,
# used where the step's `spread` flag says ("auto"), always ("always"), or never ("never": the
# order is ignored, the launch as without one). LLA_MLA_SPREAD sets it, for benchmarks;
# perf/mla_moe_bench.py sets _SPREAD.
_SPREAD = os.environ.get("LLA_MLA_SPREAD", "auto")
if _SPREAD not in ("auto", "always", "never"):
    raise ValueError(f"LLA_MLA_SPREAD={_SPREAD!r}: auto, always or never")
_SPREAD_MAX_SPLITS = 8


def _launch_config(heads: int, device: torch.device, block_h: int | None) -> _Launch:
    if device.type != "cuda":
        launch = _LAUNCH_INTERPRETER
    elif heads <= 16:
        launch = replace(_LAUNCH_FEW_HEADS, **_ENV)
    else:  # 17-64 heads: one program holds them all (a power of two >= 16)
        launch = replace(replace(_LAUNCH_MANY_HEADS, block_h=min(64, triton.next_power_of_2(heads))), **_ENV)
    return launch if block_h is None else replace(launch, block_h=block_h)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, head_blocks: int, launch: _Launch, device: torch.device) -> int:
    """Chunks per context: about `launch.waves` waves of programs over the card, rounded down, or one
    chunk (no merge) where the batch and heads fill that already. A function of the shapes only,
    never of seq_lens, so that the launch is the same in a CUDA graph."""
    if device.type != "cuda":
        return 3  # the interpreter: small contexts still cut into several chunks and merged
    target, programs = launch.waves * launch.per_sm * _num_sms(device), batch * head_blocks
    return max(1, min(64, target // programs))


def _ordered_splits(splits: int, mode: str, flag: bool, one: bool = False) -> tuple[int, bool]:
    """(chunks the launch holds, whether the kernel halves them unless the step's `spread` flag is
    set) for a launch given an order, from the default cut's `splits`, the LLA_MLA_SPREAD mode and
    whether a flag was given. `one`: a one-chunk cut (batch x head blocks over the card's program
    slots) is doubled too; halved, it writes the output directly and its merge exits at once. On
    an H200 at batch 256 (perf/RESULTS.md, 2026-12-01): -10% at 1k and -22% at 4k with contexts
    spread +-50%, +3% and +6% with all lengths equal (where doubling always cost +13% at 1k)."""
    if mode == "never" or not (2 <= splits <= _SPREAD_MAX_SPLITS or (one and splits == 1)):
        return splits, False
    return 2 * splits, mode == "auto" and flag


def mla_decode_attention(
    q_nope: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    seq_lens: Tensor,
    scale: float,
    num_splits: int | None = None,
    block_h: int | None = None,
    min_split: int | None = None,
    w_uv: Tensor | None = None,
    order: Tensor | None = None,
    spread: Tensor | None = None,
) -> Tensor:
    """MLA attention of each request's one new token over its whole context in the latent cache.

    q_nope [B, H, R]: the no-rope query multiplied per head by W_UK (absorbed); q_pe [B, H, P]: the
    rope query; kv_cache [S, R + P]: per token the latent c_kv then the rope key k_pe (mla_store_kv
    it first), same dtype as the queries. req_to_token [*, L] int32 holds each request's cache rows
    in position order; request b is row req_idx[b] (int32) with seq_lens[b] (int32) tokens. The score
    of token t is (q_nope . c_kv[t] + q_pe . k_pe[t]) * scale. Returns [B, H, R], the softmax-weighted
    sum of c_kv (the caller applies W_UV); a request with seq_len 0 gets zeros. num_splits (any
    count >= 1), block_h (heads per program, a power of two >= 16) and min_split (the fewest tokens
    a chunk of the context holds; a short context is cut into fewer chunks) override the defaults.

    `w_uv` [H, R, V] (W_UV transposed, a layer's constant weight): the result is multiplied per
    head by it, [B, H, V] contiguous; the chunk merge does that (one launch, where a batched GEMM
    would be another), or, with one chunk (nothing to merge), torch.bmm after the kernel.

    `order` [B] int32, a permutation of the requests with the longest contexts first (the runner
    gives one in decode-only steps): where the default cut makes a few chunks a context (2-8, or
    one at up to 16 heads without `w_uv`), the launch then holds twice as many, and the longest
    contexts' chunks start first, so that shorter chunks fill in behind them. `spread` [1] int32
    (with an order): the doubled cut only where it is nonzero (`lengths_spread`; without it,
    always); a doubled one-chunk cut, halved, writes the output directly and its merge exits. The
    result is the same either way; only the work's order and cut change.
    """
    if w_uv is not None:
        assert w_uv.shape[:2] == (q_nope.shape[1], q_nope.shape[2]) and w_uv.stride(2) == 1
    if not use_triton(q_nope):
        o = mla_decode_attention_ref(q_nope, q_pe, kv_cache, req_to_token, req_idx, seq_lens, scale)
        return o if w_uv is None else _apply_w_uv(o, w_uv)
    batch, heads, rank = q_nope.shape
    rope = q_pe.shape[-1]
    assert q_pe.shape == (batch, heads, rope), f"q_pe {tuple(q_pe.shape)} for q_nope {(batch, heads)}"
    assert kv_cache.dim() == 2 and kv_cache.shape[1] == rank + rope, (
        f"kv_cache {tuple(kv_cache.shape)} is not [S, {rank} + {rope}]"
    )
    assert q_pe.dtype == q_nope.dtype == kv_cache.dtype, "queries and cache must share a dtype"
    assert req_idx.shape == (batch,) and seq_lens.shape == (batch,) and req_to_token.stride(1) == 1
    assert order is None or (order.shape == (batch,) and order.dtype == torch.int32), "order: [B] int32"
    assert spread is None or (spread.numel() == 1 and spread.dtype == torch.int32), "spread: [1] int32"
    assert q_nope.stride(2) == 1 and q_pe.stride(2) == 1 and kv_cache.stride(1) == 1
    out = torch.empty((batch, heads, rank), dtype=q_nope.dtype, device=q_nope.device)
    if batch == 0:
        return out
    launch = _launch_config(heads, q_nope.device, block_h)
    head_blocks = triton.cdiv(heads, launch.block_h)
    splits = num_splits or _num_splits(batch, head_blocks, launch, q_nope.device)
    adapt = False
    if order is not None and num_splits is None:
        one = launch.one_chunk_order and w_uv is None  # (the W_UV merge has no direct form)
        doubled, adapt = _ordered_splits(splits, _SPREAD, spread is not None, one)
        # the order pays where the chunks are doubled; elsewhere it is left out (one register
        # fewer, and the 64-head launch, at 243-255 under Triton 3.6 and spilling under 3.9, no more)
        order, splits = (order if doubled > splits else None), doubled
    assert splits >= 1 and launch.block_h >= 16 and launch.block_h & (launch.block_h - 1) == 0
    # one chunk writes `out` directly: the float32 buffers are then placeholders
    mid_shape = (batch, heads, splits) if splits > 1 else (1, 1, 1)
    mid_o = torch.empty((*mid_shape, rank), dtype=torch.float32, device=q_nope.device)
    mid_lse = torch.empty(mid_shape, dtype=torch.float32, device=q_nope.device)
    block_r = triton.next_power_of_2(rank)
    min_split = launch.min_split if min_split is None else min_split
    min_split = max(1, triton.cdiv(min_split, launch.block_n)) * launch.block_n
    _mla_decode_split_kernel[(head_blocks, splits, batch)](
        q_nope, q_pe, kv_cache, req_to_token, req_idx, seq_lens, seq_lens if order is None else order,
        spread if adapt else seq_lens, mid_o, mid_lse, out,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        heads, scale * math.log2(math.e),
        KV_LORA_RANK=rank, ROPE_DIM=rope, NUM_SPLITS=splits, MIN_SPLIT=min_split, DIRECT=splits == 1,
        HAS_ORDER=order is not None, ADAPT=adapt,
        PRECISION="ieee" if q_nope.dtype == torch.float32 else "tf32",
        BLOCK_H=launch.block_h, BLOCK_N=launch.block_n,
        BLOCK_R=block_r, BLOCK_P=max(16, triton.next_power_of_2(rope)),
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_launch(q_nope),
    )  # fmt: skip
    if splits > 1 and w_uv is not None:
        v_dim = w_uv.shape[2]
        out = torch.empty((batch, heads, v_dim), dtype=q_nope.dtype, device=q_nope.device)
        block_v = 16
        _mla_decode_merge_uv_kernel[(heads, triton.cdiv(v_dim, block_v), batch)](
            mid_o, mid_lse, w_uv, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
            KV_LORA_RANK=rank, V_DIM=v_dim, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_R=block_r,
            BLOCK_V=block_v, num_warps=4, **pdl_launch(out),
        )  # fmt: skip
        return out
    if adapt and splits == 2:  # a doubled one-chunk cut: merged only where the lengths spread
        block_hm = 4  # (a few programs a request: 4096 of one a head cost ~3 us to start for nothing)
        _mla_decode_merge_pair_kernel[(batch, triton.cdiv(heads, block_hm))](
            mid_o, mid_lse, spread, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1), heads,
            KV_LORA_RANK=rank, BLOCK_H=block_hm, BLOCK_R=block_r, num_warps=4, **pdl_launch(out),
        )  # fmt: skip
    elif splits > 1:
        _mla_decode_merge_kernel[(heads, batch)](
            mid_o, mid_lse, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            KV_LORA_RANK=rank, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_R=block_r, num_warps=4, **pdl_launch(out),
        )  # fmt: skip
    return out if w_uv is None else _apply_w_uv(out, w_uv)


def _apply_w_uv(o: Tensor, w_uv: Tensor) -> Tensor:
    """o [B, H, R] times each head's W_UV [H, R, V] -> [B, H, V] contiguous (through a [H, B, V]
    view: cuBLAS's strided batch writes it in place, no copy)."""
    out = o.new_empty(o.shape[0], o.shape[1], w_uv.shape[2])
    torch.bmm(o.transpose(0, 1), w_uv.to(o.dtype), out=out.transpose(0, 1))
    return out
