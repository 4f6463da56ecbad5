"""Routed-expert MoE (DeepSeek's routed experts, and its shared experts where the model appends
them as further experts of weight 1) as two grouped GEMMs over expert-sorted blocks: gate/up with
SiLU-and-mul fused, then down with the routing weight; the top-k sum last.

Tiles: `moe_config` takes those measured fastest on the card, from `tuned/moe_<card>.json` beside
this file (<card>: torch.cuda.get_device_name() with every character but letters and digits
replaced by "_"), written by `perf/mla_moe_bench.py --only moe --sweep --out FILE`:

    {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
     "shapes": {"E=64,I=1408,H=2048": {"1": {"block_m": 16, "block_n": 64, ...}, "8": {...}, ...}}}

each shape's tiles keyed by the token count M they were measured at (torch and triton are a
record of the sweep's versions; the lookup does not read them). Where no file or shape fits, and
on the CPU, `default_moe_config`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton
from .moe_align import moe_align_block_size

TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")


def fused_moe_ref(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    # reads x, the weights of every expert some token chose (3 * I * hidden each) and writes out:
    # at decode the expert weights are nearly all of it
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        tokens, slot = torch.where(topk_ids == e)
        gate_up = x[tokens].float() @ w13[e].float().T  # [n, 2I]
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = act.to(x.dtype).float() @ w2[e].float().T  # [n, hidden]; act rounded as the kernel does
        out.index_add_(0, tokens, down * topk_weights[tokens, slot, None].float())
    return out.to(x.dtype)


@dataclass(frozen=True)
class MoeConfig:
    """Tiles of the grouped GEMMs. block_m rows of one expert per program (the alignment unit);
    group_m row blocks share a column block in launch order, so that their weights stay in L2."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_moe_config(num_pairs: int, num_experts: int, device: torch.device) -> MoeConfig:
    """Tiles by the mean rows per expert, where nothing was measured: thin row blocks and deep K
    tiles while decode streams weights, square tiles once each expert has enough rows to reuse
    them. None spills on sm_90a (perf/sm90_compile_check.py); the 64-row tiles compile to wgmma."""
    if device.type != "cuda":
        return MoeConfig(16, 32, 32)  # the interpreter: partial tiles at the tests' small sizes
    rows = num_pairs / num_experts
    if rows <= 16:
        return MoeConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)
    if rows <= 128:
        return MoeConfig(32, 64, 128, group_m=8, num_warps=4, num_stages=3)
    return MoeConfig(64, 128, 64, group_m=8, num_warps=8, num_stages=3)


def moe_shape_key(num_experts: int, inter: int, hidden: int) -> str:
    """A shape's key in the tuned files: "E=64,I=1408,H=2048"."""
    return f"E={num_experts},I={inter},H={hidden}"


def tuned_file(device_name: str) -> str:
    """The tuned-tiles file of the card that torch.cuda.get_device_name() calls `device_name`."""
    return os.path.join(TUNED_DIR, "moe_" + re.sub(r"[^0-9A-Za-z]", "_", device_name) + ".json")


@functools.cache
def _read_tuned(path: str) -> dict[tuple[int, int, int], dict[int, MoeConfig]]:
    """{(E, I, H): {M: tiles}} of a tuned file, parsed once; empty where there is no file."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        shapes = json.load(f)["shapes"]
    tuned = {}
    for key, buckets in shapes.items():
        dims = dict(part.split("=") for part in key.split(","))
        shape = (int(dims["E"]), int(dims["I"]), int(dims["H"]))
        tuned[shape] = {int(m): MoeConfig(**tiles) for m, tiles in buckets.items()}
    return tuned


def tuned_moe_config(
    device_name: str, num_tokens: int, num_experts: int, inter: int, hidden: int
) -> MoeConfig | None:
    """The tiles measured fastest on the card at shape (E, I, H), or else at the measured shape of
    the same (I, H) and the nearest E (a weight with the shared experts appended has more experts
    than the routed shape the sweep timed), taken at the measured M nearest to `num_tokens` in log
    scale. None where the card or (I, H) was never measured."""
    shapes = _read_tuned(tuned_file(device_name))
    same_ih = [shape for shape in shapes if shape[1:] == (inter, hidden)]
    if not same_ih:
        return None
    buckets = shapes[min(same_ih, key=lambda shape: abs(shape[0] - num_experts))]
    return buckets[min(buckets, key=lambda m: (abs(math.log(m / num_tokens)), m))]


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def moe_config(
    num_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int, device: torch.device
) -> MoeConfig:
    """The tiles fused_moe launches with by default: on CUDA those tuned for the card
    (`tuned_moe_config`) where measured, else `default_moe_config`."""
    if device.type == "cuda":
        tuned = tuned_moe_config(_device_name(device.index), num_tokens, num_experts, inter, hidden)
        if tuned is not None:
            return tuned
    return default_moe_config(num_tokens * top_k, num_experts, device)


@jit
def _moe_gemm_kernel(
    A,  # [T, K] tokens (A_ROWS_PER_PAIR: row pair // top_k) or [N, K] one row per pair
    B,  # [E, N_B, K] expert weights, row-major: w13 [E, 2I, hidden] or w2 [E, hidden, I]
    C,  # [N, N_OUT] out: one row per (token, k) pair
    TOPK_WEIGHTS,  # [N] routing weight of each pair (read only with MUL_WEIGHT)
    SORTED_IDS,  # [num_blocks * BLOCK_M] pair indices grouped by expert, padded with N
    EXPERT_IDS,  # [num_blocks] expert of each block of SORTED_IDS
    NUM_PADDED,  # [1] entries of SORTED_IDS in use
    num_pairs,  # N = T * top_k
    top_k,  # pairs per token
    N_OUT,  # output columns: I with GATE_UP (B rows [0, I) gate, [I, 2I) up), else N_B
    K,  # reduction length
    stride_a,  # A row stride; rows are contiguous
    stride_be, stride_bn,  # B strides (expert, row); rows are contiguous
    stride_c,  # C row stride; rows are contiguous
    A_ROWS_PER_PAIR: tl.constexpr,  # False: A has one row per token, shared by its top_k pairs
    DIRECT: tl.constexpr,  # no alignment: row block m is pair m alone, EXPERT_IDS the pairs' experts
    GATE_UP: tl.constexpr,  # C = silu(A @ B[:I].T) * (A @ B[I:].T)
    MUL_WEIGHT: tl.constexpr,  # C = weight * (A @ B.T)
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for float32 tensors)
    BLOCK_M: tl.constexpr,  # sorted entries per program, the alignment unit
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row blocks that walk the column blocks together
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # -- which tile: grouped launch order, so that neighbouring programs reuse the same weights --
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    if DIRECT:  # one pair a block, in its first row; the others padding (num_pairs)
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(NUM_PADDED):
            return  # past the blocks in use: the grid is sized for the worst routing
        # -- the block's pairs, their A rows and their expert --
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED_IDS + offs_m).to(tl.int64)
    mask_m = pair < num_pairs  # padding entries hold num_pairs
    a_row = pair if A_ROWS_PER_PAIR else pair // top_k
    expert = tl.load(EXPERT_IDS + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_row[:, None] * stride_a + offs_k[None, :]
    b_ptrs = B + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    # -- the products over K; with GATE_UP a second accumulator takes the up half of B --
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATE_UP:
            b_up = tl.load(b_ptrs + N_OUT * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # -- epilogue in float32, one rounding to C's dtype --
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(TOPK_WEIGHTS + pair, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pair[:, None] * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _grouped_gemm(a, b, c, topk_weights, aligned, top_k, n_out, cfg, a_rows_per_pair, gate_up, mul_weight):
    """aligned: moe_align_block_size's (sorted ids, block experts, padded count), or (None,
    topk_ids flattened, None) for the direct launch (a block per pair)."""
    sorted_ids, expert_ids, num_padded = aligned
    direct = sorted_ids is None
    if direct:
        sorted_ids = num_padded = expert_ids  # not read
    grid = (expert_ids.numel() * triton.cdiv(n_out, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, b, c, topk_weights, sorted_ids, expert_ids, num_padded,
        c.shape[0], top_k, n_out, a.shape[1],
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_ROWS_PER_PAIR=a_rows_per_pair, DIRECT=direct, GATE_UP=gate_up, MUL_WEIGHT=mul_weight,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(a),
    )  # fmt: skip


# Up to this many tokens fused_moe launches its GEMMs without the alignment kernel (a row block per
# pair): one token's experts are distinct, so each block of the aligned launch held one row too.
# LLA_MOE_DIRECT_MAX_TOKENS sets it for benchmarks (0: always align).
DIRECT_MAX_TOKENS = int(os.environ.get("LLA_MOE_DIRECT_MAX_TOKENS", "1"))


def fused_moe(
    x: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    config: MoeConfig | None = None,
    sum_experts: bool = True,
    direct: bool | None = None,
) -> Tensor:
    """Σ_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j].

    x [T, hidden]; w13 [E, 2I, hidden] (gate rows then up rows) and w2 [E, hidden, I], both in x's
    dtype, rows contiguous; topk_weights [T, k] float (any float dtype), topk_ids [T, k] int32 or
    int64 in [0, E), both contiguous. Returns [T, hidden] in x's dtype; products accumulate in float32,
    the activation and each expert's output are rounded to x's dtype before the next step. No host sync.
    `config` overrides the tiles `moe_config` picks. `sum_experts=False`: the terms of the sum,
    unsummed, [T, k, hidden] (each expert's weighted output; [T, 1, hidden], the sum, on the
    reference path), for a consumer that sums them itself (`rms_norm` of parts). `direct`: each
    (token, k) pair its own row block, with no alignment kernel (None: up to DIRECT_MAX_TOKENS
    tokens, where the pairs' experts are distinct and a block would hold one row anyway).
    """
    if not use_triton(x):
        out = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
        return out if sum_experts else out[:, None]
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden), f"w13 {tuple(w13.shape)} for hidden {hidden}"
    assert w2.shape == (num_experts, hidden, inter), f"w2 {tuple(w2.shape)} is not [E, {hidden}, {inter}]"
    assert topk_ids.shape == topk_weights.shape == (num_tokens, top_k), "topk_ids, topk_weights: [T, k]"
    assert x.dtype == w13.dtype == w2.dtype, "x and the expert weights must share a dtype"
    assert topk_weights.is_floating_point() and not topk_ids.is_floating_point()
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    assert topk_ids.is_contiguous() and topk_weights.is_contiguous()
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x) if sum_experts else x.new_zeros(num_tokens, 1, hidden)
    cfg = config or moe_config(num_tokens, top_k, num_experts, inter, hidden, x.device)
    if direct is None:
        direct = num_tokens <= DIRECT_MAX_TOKENS
    if direct:
        aligned = (None, topk_ids.view(-1), None)
    else:
        aligned = moe_align_block_size(topk_ids, num_experts, cfg.block_m)
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, act, topk_weights, aligned, top_k, inter, cfg, False, True, False)
    down = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, down, topk_weights, aligned, top_k, hidden, cfg, True, False, True)
    down = down.view(num_tokens, top_k, hidden)
    return down.sum(dim=1) if sum_experts else down
