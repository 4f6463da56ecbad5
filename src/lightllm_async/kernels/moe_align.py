"""Group the (token, expert) pairs of a routed MoE by expert, each group padded to whole blocks, so
that one grouped-GEMM program multiplies one block of rows by one expert's weights."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton


def max_moe_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the blocks that moe_align_block_size fills, from the shapes alone (for a
    launch that is the same in every replay of a CUDA graph): each expert that has pairs rounds its
    count up by less than one block."""
    return num_pairs // block_m + min(num_experts, num_pairs)


def moe_align_block_size_ref(
    topk_ids: Tensor, num_experts: int, block_m: int
) -> tuple[Tensor, Tensor, Tensor]:
    # reads topk_ids, writes about as many int32 entries again plus the padding
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    max_blocks = max_moe_blocks(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert, in pair order
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
    dest = (padded_end - padded)[flat[order]] + rank
    sorted_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=flat.device) * block_m
    expert_ids = torch.searchsorted(padded_end, block_start, right=True).clamp_max(num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


@jit
def _moe_align_kernel(
    TOPK_IDS,  # [N] expert of each (token, k) pair, the [T, k] choices flattened row by row
    SORTED_IDS,  # [max_blocks * BLOCK_M] out: pair indices grouped by expert, padded with N
    EXPERT_IDS,  # [max_blocks] out: expert of each block of BLOCK_M entries of SORTED_IDS
    NUM_PADDED,  # [1] out: entries of SORTED_IDS in use, a multiple of BLOCK_M
    num_pairs,  # N
    BLOCK_M: tl.constexpr,  # rows of one grouped-GEMM block
    BLOCK_E: tl.constexpr,  # >= number of experts, a power of two
    BLOCK: tl.constexpr,  # pairs per iteration
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program per expert: each counts every expert's pairs (to find where its group starts),
    # then writes its own group, its padding and its blocks' expert ids
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)

    # -- where this expert's group starts: the padded sizes of the groups before it --
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_pairs
        ids = tl.load(TOPK_IDS + offs, mask=mask, other=0).to(tl.int32)
        counts += tl.histogram(ids, BLOCK_E, mask=mask)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    group_start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    group_size = tl.cdiv(count, BLOCK_M) * BLOCK_M

    # -- the group: this expert's pair indices in pair order, then the padding --
    seen = 0
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(TOPK_IDS + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ids == e
        rank = seen + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(SORTED_IDS + group_start + rank, offs, mask=hit)
        seen += tl.sum(hit.to(tl.int32), axis=0)
    offs_pad = count + tl.arange(0, BLOCK_M)
    pad = tl.zeros([BLOCK_M], dtype=tl.int32) + num_pairs
    tl.store(SORTED_IDS + group_start + offs_pad, pad, mask=offs_pad < group_size)

    # -- the expert of each of the group's blocks --
    first_block = group_start // BLOCK_M
    num_blocks = group_size // BLOCK_M
    expert = tl.zeros([BLOCK], dtype=tl.int32) + e
    for blk in range(0, num_blocks, BLOCK):
        offs_b = blk + tl.arange(0, BLOCK)
        tl.store(EXPERT_IDS + first_block + offs_b, expert, mask=offs_b < num_blocks)
    if e == 0:
        tl.store(NUM_PADDED, tl.sum(padded, axis=0))


def moe_align_block_size(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the pairs of topk_ids [T, k] (int32 or int64, values in [0, num_experts)) by expert.

    Returns, all int32 on topk_ids' device, without a host sync:
    sorted_ids [max_moe_blocks(T*k, E, block_m) * block_m]: each expert's pair indices (t * k + j)
        in pair order, experts in order, each group padded with T*k to a multiple of block_m;
    expert_ids [max_blocks]: the expert of each block of block_m entries;
    num_padded [1]: the entries in use (a multiple of block_m); entries and blocks past it are
        unspecified and must not be read.
    """
    if not use_triton(topk_ids):
        return moe_align_block_size_ref(topk_ids, num_experts, block_m)
    assert topk_ids.dim() == 2 and topk_ids.is_contiguous(), "topk_ids must be a contiguous [T, k]"
    assert not topk_ids.is_floating_point() and num_experts >= 1 and block_m >= 1
    num_pairs = topk_ids.numel()
    max_blocks = max_moe_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)  # the kernel writes it
    if num_pairs == 0:
        return sorted_ids, expert_ids, num_padded.zero_()
    # the interpreter takes small chunks so that the tests' few hundred pairs span several
    chunk = min(4096, max(16, triton.next_power_of_2(num_pairs))) if topk_ids.is_cuda else 64
    _moe_align_kernel[(num_experts,)](
        topk_ids, sorted_ids, expert_ids, num_padded, num_pairs,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK=chunk, num_warps=4, **pdl_launch(topk_ids),
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded
