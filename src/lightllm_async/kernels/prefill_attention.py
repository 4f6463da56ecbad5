"""Prefill ("extend") attention: causal attention of new tokens over their requests' caches,
prefix tokens cached by earlier steps included; varlen, GQA, and v's head dim free of q/k's (MLA
attends with 192-dim q.k and 128-dim v)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import cpu_shapes
from .attention_block import (
    attend_block,
    attend_init,
    attend_kv,
    attend_ref,
    attend_result,
    attend_rows,
    attend_tile,
)
from .backend import jit, tl, triton, use_triton


def prefill_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    q_start: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    # compute-bound: 2 * Hq * (D + Dv) flops per (query, visible key) pair; reads q and the
    # requests' K and V rows (the kernel once per BLOCK_M queries and head), writes out
    out = q.new_zeros(q.shape[:2] + v_cache.shape[2:])  # [T, Hq, Dv]
    for b in range(len(req_idx)):
        start, end, seq_len = int(q_start[b]), int(q_start[b + 1]), int(seq_lens[b])
        if end == start:
            continue
        rows = req_to_token[int(req_idx[b]), :seq_len].long()
        k, v = k_cache[rows].float(), v_cache[rows].float()
        pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]
        out[start:end] = attend_ref(q[start:end].float(), k, v, scale, mask).to(q.dtype)
    return out


def prefill_attention_cpu(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    q_start: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    """The CPU path (no Triton there): per request, torch's scaled_dot_product_attention, whose CPU
    kernel works in blocks and skips the masked half, over the request's rows gathered from the
    cache; causal from the top left when there is no cached prefix, else an explicit mask that
    lines the new tokens up with the end of the context. The reference builds every score.

    In 16-bit dtypes the query and key counts are rounded up to `cpu_shapes.bucket`, so that SDPA
    (oneDNN) sees few shapes over a server's life: padding keys come after every real query's
    position (causal) or are masked, padding queries' outputs are dropped."""
    out = q.new_empty(q.shape[:2] + v_cache.shape[2:])  # [T, Hq, Dv]
    group = q.shape[1] // k_cache.shape[1]  # kv heads repeated: SDPA's enable_gqa takes its slow path
    # the counts rounded (16-bit) or as they are (`int`: float32 goes through MKL, no per-shape state)
    bucket = functools.partial(cpu_shapes.bucket, fine=True) if cpu_shapes.bounded(q) else int
    bounds = zip(
        q_start[:-1].tolist(), q_start[1:].tolist(), seq_lens.tolist(), req_idx.tolist(), strict=True
    )
    for start, end, seq_len, row in bounds:
        if end == start:
            continue
        new, keys = end - start, bucket(seq_len)
        rows = req_to_token[row, :seq_len].long()
        # padding keys are zeros: never seen, but a cache row's garbage (NaN) would reach 0 * v
        k, v = (cpu_shapes.pad_rows(c[rows], keys).transpose(0, 1) for c in (k_cache, v_cache))  # [Hk, S, *]
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache: widened (nothing if it is q's dtype)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # [Hq, S, *]
        queries, mask = bucket(new), None
        if new != seq_len:  # the new tokens at the context's end; padding queries see every key
            pos = torch.arange(seq_len - new, seq_len - new + queries, device=q.device)
            mask = torch.arange(keys, device=q.device)[None, :] <= pos[:, None]  # [queries, keys]
        o = torch.nn.functional.scaled_dot_product_attention(  # 4-D: 3-D inputs take the math path
            cpu_shapes.pad_rows(q[start:end], queries).transpose(0, 1)[None],
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
        )  # [1, Hq, queries, Dv]
        out[start:end] = o[0, :, :new].transpose(0, 1)
    return out


# Run between piecewise graphs on each step's own requests: nothing that changes from step to step
# may choose a specialization (a compile in mid-serving), neither the request count (1, a multiple
# of 16) nor the alignment of the per-request arrays (a mixed step passes them sliced after its decodes).
@jit(do_not_specialize=["num_reqs"], do_not_specialize_on_alignment=["REQ_IDX", "Q_START", "SEQ_LENS"])
def _prefill_kernel(
    Q,  # [T, Hq, D] the new tokens' queries, packed request after request
    K_CACHE,  # [S, Hk, D] key cache, the new tokens' keys stored already
    V_CACHE,  # [S, Hk, Dv] value cache
    REQ_TO_TOKEN,  # [R, L] cache rows of each request, in position order
    REQ_IDX,  # [B] row of REQ_TO_TOKEN of each request
    Q_START,  # [B + 1] first row in Q of each request, then T
    SEQ_LENS,  # [B] total tokens of each request, cached prefix included
    OUT,  # [T, Hq, Dv] attention output
    K_NEW,  # [T, Hk, D] with NEW_KV: the new tokens' keys, row by row as Q (else unused)
    V_NEW,  # [T, Hk, Dv] with NEW_KV: their values
    stride_q_t, stride_q_h,  # Q strides; the head dim is contiguous
    stride_k_s, stride_k_h,  # K_CACHE strides
    stride_v_s, stride_v_h,  # V_CACHE strides
    stride_r2t,  # REQ_TO_TOKEN row stride
    stride_o_t, stride_o_h,  # OUT strides
    stride_kn_t, stride_kn_h,  # K_NEW strides
    stride_vn_t, stride_vn_h,  # V_NEW strides
    num_reqs,  # B
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # D
    V_DIM: tl.constexpr,  # Dv
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for float32 tensors)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # context tokens per iteration
    BLOCK_NP: tl.constexpr,  # with NEW_KV: cached-prefix tokens per iteration (gathered through the table)
    BLOCK_D: tl.constexpr,  # >= HEAD_DIM, a power of two
    BLOCK_DV: tl.constexpr,  # >= V_DIM, a power of two
    NEW_KV: tl.constexpr,  # the new tokens' k/v from K_NEW/V_NEW (contiguous), the prefix's from the cache
    KN_DESC,  # with TMA: a tensor descriptor of K_NEW as [T, Hk * D], [BLOCK_N, D] blocks (else None)
    VN_DESC,  # with TMA: the same of V_NEW as [T, Hk * Dv]
    TMA: tl.constexpr,  # the new tokens' whole key blocks through the descriptors (Hopper: TMA loads)
    ORDER: tl.constexpr,  # 0: grid (blocks, heads); 1: (heads, blocks), so that the query heads of a kv
    # head run together; 2: as 1 with the blocks in reverse, the longest (a request's last) first
):  # fmt: skip
    # one program: BLOCK_M queries of one request and one query head. Request b owns programs
    # q_start[b] // BLOCK_M + b onwards, which leaves it at least cdiv(n_b, BLOCK_M) of them and
    # bounds the grid by T // BLOCK_M + B without reading lengths on the host.
    if ORDER == 0:
        pid = tl.program_id(0)
        head = tl.program_id(1)
    else:
        pid = tl.program_id(1)
        head = tl.program_id(0)
        if ORDER == 2:
            pid = tl.num_programs(1) - 1 - pid

    # -- find this program's request: the last b with q_start[b] // BLOCK_M + b <= pid --
    lo = pid * 0
    hi = lo + num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        before = tl.load(Q_START + mid) // BLOCK_M + mid <= pid
        lo = tl.where(before, mid + 1, lo)
        hi = tl.where(before, hi, mid)
    b = lo - 1
    q_beg = tl.load(Q_START + b)
    num_new = tl.load(Q_START + b + 1) - q_beg
    m_block = pid - (q_beg // BLOCK_M + b)
    if m_block * BLOCK_M >= num_new:
        return
    seq_len = tl.load(SEQ_LENS + b)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    kv_head = head // GROUP

    # -- the block's queries and their positions --
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_new
    pos_m = seq_len - num_new + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_beg + offs_m).to(tl.int64)
    q_ptrs = Q + q_rows[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < V_DIM

    # -- online softmax: first over the context every query of the block sees (whole blocks, no
    # mask), then over the rest up to the last query, with the causal mask --
    m_i, l_i, acc = attend_init(BLOCK_M, BLOCK_DV)
    req_row = REQ_TO_TOKEN + req * stride_r2t
    k_head, v_head = K_CACHE + kv_head * stride_k_h, V_CACHE + kv_head * stride_v_h
    if NEW_KV:
        # the cached prefix through the cache (whole blocks, then its last partial one), then the
        # new tokens at their rows of K_NEW/V_NEW: whole blocks before this block's first query,
        # the causal mask on the rest
        prefix = seq_len - num_new
        whole = prefix // BLOCK_NP * BLOCK_NP
        for n in range(0, whole, BLOCK_NP):
            m_i, l_i, acc = attend_block(
                q, m_i, l_i, acc, n + tl.arange(0, BLOCK_NP), whole, whole, req_row, k_head, v_head,
                stride_k_s, stride_v_s, offs_d, mask_d, offs_dv, mask_dv, qk_scale, MASKED=False,
                PRECISION=PRECISION,
            )  # fmt: skip
        if whole < prefix:
            m_i, l_i, acc = attend_block(
                q, m_i, l_i, acc, whole + tl.arange(0, BLOCK_NP), prefix, prefix, req_row, k_head, v_head,
                stride_k_s, stride_v_s, offs_d, mask_d, offs_dv, mask_dv, qk_scale, MASKED=True,
                PRECISION=PRECISION,
            )  # fmt: skip
        kn_head, vn_head = K_NEW + kv_head * stride_kn_h, V_NEW + kv_head * stride_vn_h
        first = m_block * BLOCK_M  # new tokens before it: seen by every query of the block
        # whole blocks of rows that all exist (BLOCK_M is a multiple of BLOCK_N): pointers stepped
        # along, loads without a row mask
        offs_n = tl.arange(0, BLOCK_N)
        rows_n = (q_beg + offs_n).to(tl.int64)
        kn_ptrs = kn_head + rows_n[:, None] * stride_kn_t + offs_d[None, :]
        vn_ptrs = vn_head + rows_n[:, None] * stride_vn_t + offs_dv[None, :]
        if TMA:  # the descriptors cover whole rows of heads: this kv head's columns
            for j in range(0, first, BLOCK_N):
                k = KN_DESC.load([q_beg + j, kv_head * HEAD_DIM])
                v = VN_DESC.load([q_beg + j, kv_head * V_DIM])
                m_i, l_i, acc = attend_kv(
                    q, m_i, l_i, acc, k, v, qk_scale, first, offs_n, MASKED=False, PRECISION=PRECISION
                )
        else:
            for _ in range(0, first, BLOCK_N):
                m_i, l_i, acc = attend_tile(
                    q, m_i, l_i, acc, kn_ptrs, vn_ptrs, mask_d, mask_dv, qk_scale, first, offs_n,
                    MASKED=False, FULL_D=(BLOCK_D == HEAD_DIM) and (BLOCK_DV == V_DIM), PRECISION=PRECISION,
                )  # fmt: skip
                kn_ptrs += BLOCK_N * stride_kn_t
                vn_ptrs += BLOCK_N * stride_vn_t
        for j in range(first, tl.minimum(num_new, first + BLOCK_M), BLOCK_N):
            offs_j = j + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = attend_rows(
                q, m_i, l_i, acc, (q_beg + offs_j).to(tl.int64), offs_j < num_new, offs_j,
                offs_m[:, None] + 1, kn_head, vn_head, stride_kn_t, stride_vn_t, offs_d, mask_d, offs_dv,
                mask_dv, qk_scale, MASKED=True, PRECISION=PRECISION,
            )  # fmt: skip
    else:
        seen_by_all = (seq_len - num_new + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
        for n in range(0, seen_by_all, BLOCK_N):
            m_i, l_i, acc = attend_block(
                q, m_i, l_i, acc, n + tl.arange(0, BLOCK_N), seen_by_all, seen_by_all, req_row, k_head,
                v_head, stride_k_s, stride_v_s, offs_d, mask_d, offs_dv, mask_dv, qk_scale, MASKED=False,
                PRECISION=PRECISION,
            )  # fmt: skip
        last = tl.minimum(seq_len, seq_len - num_new + (m_block + 1) * BLOCK_M)
        for n in range(seen_by_all, last, BLOCK_N):
            m_i, l_i, acc = attend_block(
                q, m_i, l_i, acc, n + tl.arange(0, BLOCK_N), last, pos_m[:, None] + 1, req_row, k_head,
                v_head, stride_k_s, stride_v_s, offs_d, mask_d, offs_dv, mask_dv, qk_scale, MASKED=True,
                PRECISION=PRECISION,
            )  # fmt: skip

    # -- normalize and store; rows past the request's queries are not stored --
    out, _ = attend_result(m_i, l_i, acc)
    o_ptrs = OUT + q_rows[:, None] * stride_o_t + head * stride_o_h + offs_dv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


def _blocks(q: Tensor, batch: int, new_kv: bool = False) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, grid order, prefix BLOCK_N) from shapes known on
    the host (measured on H100; with new_kv on an H200, perf/prefill_attention_bench.py --sweep,
    2026-11-30, at 4k causal: 128x128 with 8 warps 0.389 ms against 0.615 ms with the gathering
    kernel's 128x64 and 4 warps; then, with the new tokens read in whole unmasked blocks and the
    longest query blocks first (order 2), 128x64 with 8 warps 0.320 ms, 128x128 0.336 ms; for
    4 x 1024 new after 3072 cached the gathered prefix wants 128-token blocks: 0.638 ms against
    0.743 ms with 64). On Hopper the new tokens' key blocks come through tensor descriptors (the
    7th field; TMA copies): 128x128 at 4k causal 0.287 ms (68% of the matmul rate measured in that
    process) against 0.325 ms, and no slower at 4 x 1024 after 3072 or 16 x 100 after 2000."""
    if not q.is_cuda:
        return 16, 16, 4, 1, 0, 16  # the interpreter: small blocks so that small tests cross block edges
    if q.shape[-1] <= 64 or q.shape[0] < 128 * batch:
        return 64, 64, 4, 3, 0, 64  # small heads, or few new tokens per request (chunked prefill)
    if new_kv and q.shape[-1] <= 128 and q.element_size() <= 2:  # float32 tiles would not fit
        if _has_tma(q.device):  # 2026-11-30, H200, 4k causal: 0.287 ms against 0.325 without TMA
            return 128, 128, 8, 3, 2, 128, True
        return 128, 64, 8, 3, 2, 128  # in shared memory (393 KB asked at head dim 80, 2026-11-30)
    return 128, 64, 4, 3, 0, 64


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Hopper or later: tensor-descriptor loads are TMA copies there (elsewhere plain loads, and
    the 128 x 128 tile asks for more shared memory than an A100 has)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def _descriptors(k_new: Tensor, v_new: Tensor, block_n: int) -> tuple[object, object] | tuple[None, None]:
    """Tensor descriptors of the new tokens' k and v as [T, heads * dim] matrices read in [block_n,
    dim] blocks (on Hopper the loads become TMA copies), or (None, None) where they cannot be: head
    dims not a power of two (the block would pad them), heads not packed within a row, or rows and
    bases not 16-byte aligned as TMA needs."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a Triton without them
        return None, None
    views = []
    for t in (k_new, v_new):
        t_rows, heads, dim = t.shape
        size = t.element_size()
        if (
            dim != triton.next_power_of_2(dim)
            or t.stride(1) != dim
            or (t.stride(0) * size) % 16
            or t.data_ptr() % 16
        ):
            return None, None
        view = t.as_strided((t_rows, heads * dim), (t.stride(0), 1))
        views.append(TensorDescriptor.from_tensor(view, [block_n, dim]))
    return views[0], views[1]


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_idx: Tensor,
    q_start: Tensor,
    seq_lens: Tensor,
    scale: float,
    blocks: tuple[int, int, int, int] | None = None,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
) -> Tensor:
    """Causal attention of the new tokens of B requests, packed in q [T, Hq, D], over k_cache
    [S, Hk, D] and v_cache [S, Hk, Dv]: out [T, Hq, Dv] (Dv may differ from D).

    Request b owns q rows q_start[b]:q_start[b+1] (q_start [B+1] int32) and has seq_lens[b] tokens
    in all, cached prefix included; its new token i sits at position
    seq_lens[b] - (q_start[b+1] - q_start[b]) + i and attends to cache positions 0..that position,
    found through req_to_token[req_idx[b]]. The new tokens' k and v must be stored first, and
    q_start[B] must be T. `blocks`: (BLOCK_M, BLOCK_N, num_warps, num_stages[, order[, prefix
    BLOCK_N[, tma]]]) instead of the chosen ones (order: the grid's, the kernel's ORDER; the
    prefix's block: with k_new, the cached prefix's tokens per iteration, BLOCK_N unless given;
    tma: with k_new, its whole key blocks through tensor descriptors where `_descriptors` allows,
    chosen on Hopper for long prompts;
    perf/prefill_attention_bench.py sweeps them).

    `k_new` [T, Hk, D] and `v_new` [T, Hk, Dv]: the new tokens' k and v (also stored in the cache),
    row by row as q; given, the kernel reads them there, contiguous, rather than gathering them
    through req_to_token, and the cache only for each request's cached prefix.
    """
    if not use_triton(q):
        fallback = prefill_attention_cpu if q.device.type == "cpu" else prefill_attention_ref
        return fallback(q, k_cache, v_cache, req_to_token, req_idx, q_start, seq_lens, scale)
    num_tokens, hq, dim = q.shape
    batch, hk, dim_v = req_idx.shape[0], k_cache.shape[1], v_cache.shape[2]
    assert k_cache.shape[2] == dim and v_cache.shape[:2] == k_cache.shape[:2] and hq % hk == 0
    assert q_start.shape == (batch + 1,) and seq_lens.shape == (batch,) and req_to_token.stride(1) == 1
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    new_kv = k_new is not None
    if new_kv:
        assert (
            v_new is not None
            and k_new.shape == (num_tokens, hk, dim)
            and v_new.shape == (num_tokens, hk, dim_v)
        )
        assert k_new.stride(2) == 1 and v_new.stride(2) == 1
    else:
        k_new = v_new = k_cache  # unused
    out = torch.empty((num_tokens, hq, dim_v), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    block_m, block_n, num_warps, num_stages, *rest = blocks or _blocks(q, batch, new_kv)
    order = rest[0] if rest else 0
    block_np = rest[1] if len(rest) > 1 else block_n
    kn_desc = vn_desc = None
    if len(rest) > 2 and rest[2] and new_kv:
        kn_desc, vn_desc = _descriptors(k_new, v_new, block_n)
    assert not new_kv or block_m % block_n == 0, "the new tokens are read in whole BLOCK_N blocks"
    grid = (num_tokens // block_m + batch, hq) if order == 0 else (hq, num_tokens // block_m + batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, req_to_token, req_idx, q_start, seq_lens, out, k_new, v_new,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        batch, scale * math.log2(math.e),
        GROUP=hq // hk, HEAD_DIM=dim, V_DIM=dim_v, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NP=block_np, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_DV=triton.next_power_of_2(dim_v), NEW_KV=new_kv, ORDER=order,
        KN_DESC=kn_desc, VN_DESC=vn_desc, TMA=kn_desc is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
