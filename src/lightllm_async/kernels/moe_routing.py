"""DeepSeek's expert routing: router logits -> each token's top-k experts and their weights, plus the
fused shared experts every token takes, on the device with no host sync. One Triton program per
token does the whole of it (scores, groups, top-k, normalization, scaling, the shared experts), where
the PyTorch reference takes 4 (greedy) to ~14 (noaux_tc) small kernels and 2-3 more for the shared
experts."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def _check(
    logits: Tensor, top_k: int, method: str, n_group: int | None, topk_group: int | None, bias: Tensor | None
) -> None:
    if method not in TOPK_METHODS:
        raise ValueError(f"topk_method {method!r} is not one of {TOPK_METHODS}")
    if method == "noaux_tc" and bias is None:
        raise ValueError("noaux_tc needs e_score_correction_bias")
    assert logits.dim() in (2, 3), f"router logits must be [T, E] or [P, T, E], not {tuple(logits.shape)}"
    num_experts = logits.shape[-1]
    assert 1 <= top_k <= num_experts, f"top_k {top_k} with {num_experts} experts"
    if method != "greedy":
        assert n_group and topk_group and num_experts % n_group == 0 and topk_group <= n_group, (
            f"{method} needs n_group dividing {num_experts} and topk_group <= n_group"
        )
        assert top_k <= topk_group * (num_experts // n_group), "top_k exceeds the kept groups' experts"
    if method == "noaux_tc":
        assert num_experts // n_group >= 2, "noaux_tc scores a group by its best two experts"
        assert bias.shape == (num_experts,)


def _group_mask(choice: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """[T, E] True for the experts of each token's topk_group best groups of E / n_group experts, a
    group scored by its best expert ("max") or by the sum of its best two ("top2_sum")."""
    grouped = choice.view(choice.shape[0], n_group, -1)
    if group_score == "max":
        scores = grouped.max(dim=-1).values
    else:
        scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = scores.topk(topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)


def select_experts_ref(
    router_logits: Tensor,
    top_k: int,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: Tensor | None = None,
    num_shared: int = 0,
) -> tuple[Tensor, Tensor]:
    # reads the logits [T, E] several times over (~14 small ops for noaux_tc), writes [T, k + s] twice
    _check(router_logits, top_k, topk_method, n_group, topk_group, e_score_correction_bias)
    logits = router_logits.float()
    if logits.dim() == 3:  # partial sums over slices of the hidden dim (router_logits_parts)
        logits = logits.sum(dim=0)
    num_tokens, num_experts = logits.shape

    if topk_method == "noaux_tc":
        scores = logits.sigmoid()
        choice = scores + e_score_correction_bias.float()
        keep = _group_mask(choice, n_group, topk_group, "top2_sum")
        choice = choice.masked_fill(~keep, float("-inf"))
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        if topk_method == "group_limited_greedy":
            choice = scores.masked_fill(~_group_mask(scores, n_group, topk_group, "max"), 0.0)
    topk_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)

    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    if num_shared:
        shared = torch.arange(num_experts, num_experts + num_shared, device=logits.device)
        topk_ids = torch.cat([topk_ids, shared.expand(num_tokens, -1)], dim=1)
        topk_weights = torch.cat([topk_weights, topk_weights.new_ones(num_tokens, num_shared)], dim=1)
    return topk_weights, topk_ids


@jit
def _select_experts_kernel(
    LOGITS,  # [NUM_PARTS, T, E] router logits (summed over the parts), any float dtype, read as float32
    BIAS,  # [E] e_score_correction_bias (noaux_tc only)
    IDS,  # [T, TOP_K + NUM_SHARED] int32 out, contiguous
    WEIGHTS,  # [T, TOP_K + NUM_SHARED] float32 out, contiguous
    stride_logits,  # row stride of LOGITS
    stride_part,  # part stride of LOGITS
    num_experts,  # E
    group_size,  # E / N_GROUP
    scaling,  # routed_scaling_factor, for the routed experts only
    METHOD: tl.constexpr,  # one of TOPK_METHODS
    N_GROUP: tl.constexpr,  # groups of experts (1 for greedy)
    TOPK_GROUP: tl.constexpr,  # groups kept
    TOP_K: tl.constexpr,  # routed experts per token
    NUM_SHARED: tl.constexpr,  # experts E..E+NUM_SHARED-1 appended with weight 1
    NORM: tl.constexpr,  # divide the routed weights by their sum
    NUM_PARTS: tl.constexpr,  # partial logits to sum (1: the logits themselves)
    BLOCK_G: tl.constexpr,  # >= N_GROUP, a power of two
    BLOCK_S: tl.constexpr,  # >= group_size, a power of two
    BLOCK_OUT: tl.constexpr,  # >= TOP_K + NUM_SHARED, a power of two
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    # one program per token; the experts laid out [group, expert in group] in registers
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    valid = (offs_g[:, None] < N_GROUP) & (offs_s[None, :] < group_size)
    expert = tl.where(valid, offs_g[:, None] * group_size + offs_s[None, :], 0)  # [G, S]
    neg_inf = float("-inf")

    # -- scores, and the choice that ranks them --
    x = tl.load(LOGITS + row * stride_logits + expert, mask=valid, other=neg_inf).to(tl.float32)
    for part in tl.static_range(1, NUM_PARTS):
        x += tl.load(LOGITS + part * stride_part + row * stride_logits + expert, mask=valid, other=0.0)
    if METHOD == "noaux_tc":
        scores = tl.sigmoid(x)
        bias = tl.load(BIAS + expert, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, scores + bias, neg_inf)
    else:
        p = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))  # 0 in the padding
        scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
        choice = tl.where(valid, scores, neg_inf)

    # -- keep the TOPK_GROUP best groups: by their best choice, or by their best two (noaux_tc) --
    if METHOD != "greedy":
        best = tl.max(choice, axis=1)  # [G]
        if METHOD == "noaux_tc":  # the best two: drop one lane holding the best, take the best again
            lane = offs_s[None, :] + tl.zeros_like(expert)
            best_lane = tl.min(tl.where(choice == best[:, None], lane, BLOCK_S), axis=1)
            best += tl.max(tl.where(lane == best_lane[:, None], neg_inf, choice), axis=1)
        kept = offs_g < 0
        for _ in tl.static_range(TOPK_GROUP):  # the lowest group on a tie
            g = tl.min(tl.where(best == tl.max(best, axis=0), offs_g, BLOCK_G), axis=0)
            kept = kept | (offs_g == g)
            best = tl.where(offs_g == g, neg_inf, best)
        choice = tl.where(kept[:, None], choice, neg_inf)

    # -- the TOP_K best choices, weighted by their scores --
    offs_out = tl.arange(0, BLOCK_OUT)
    ids = tl.zeros([BLOCK_OUT], dtype=tl.int32)
    weights = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        # the lowest expert on a tie; never past E - 1, even for NaN logits that match nothing
        e = tl.min(tl.min(tl.where(choice == top, expert, num_experts - 1), axis=1), axis=0)
        hit = valid & (expert == e)
        w = top  # softmax methods choose by the score itself
        if METHOD == "noaux_tc":  # chosen by the biased score, weighted by the unbiased one
            w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)
        choice = tl.where(hit, neg_inf, choice)
        ids = tl.where(offs_out == i, e, ids)
        weights = tl.where(offs_out == i, w, weights)
    if NORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scaling

    # -- then the shared experts, unscaled --
    shared = offs_out >= TOP_K
    ids = tl.where(shared, num_experts + offs_out - TOP_K, ids)
    weights = tl.where(shared, 1.0, weights)
    width = TOP_K + NUM_SHARED
    tl.store(IDS + row * width + offs_out, ids, mask=offs_out < width)
    tl.store(WEIGHTS + row * width + offs_out, weights, mask=offs_out < width)


def select_experts(
    router_logits: Tensor,
    top_k: int,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: Tensor | None = None,
    num_shared: int = 0,
) -> tuple[Tensor, Tensor]:
    """Each token's experts: router_logits [T, E] (or [P, T, E]: partial sums, added up first, as
    `router_logits_parts` gives) -> (topk_weights [T, top_k + num_shared] float32,
    topk_ids [T, top_k + num_shared]), contiguous, ready for fused_moe; ids int32 from the kernel,
    int64 from the reference (fused_moe and moe_align_block_size take either). No host sync.

    greedy (DeepSeek-V2): softmax scores, the top_k best. group_limited_greedy (V2): softmax scores;
    only the experts of the topk_group groups with the highest best score compete. noaux_tc (V3, R1):
    sigmoid scores; the scores plus e_score_correction_bias [E] choose the groups (each scored by the
    sum of its two best) and the experts, while the unbiased scores weight the chosen ones.
    Then, as in DeepSeek-V3 (and transformers' V3), the weights are divided by their sum (+ 1e-20)
    when norm_topk_prob and always multiplied by routed_scaling_factor. DeepSeek-V2's own code skips
    the factor when it normalizes (transformers' V2 never normalizes); the released V2 checkpoints set
    norm_topk_prob false, where all agree. A V2 model with norm_topk_prob true passes factor 1.0.
    Last come the num_shared fused shared experts, ids E..E+num_shared-1 with weight 1, unscaled.

    The routed experts of a row come in no particular order. On equal choices the kernel takes the
    lowest expert (and the lowest group); the reference takes whichever torch.topk returns.
    """
    if not use_triton(router_logits):
        return select_experts_ref(
            router_logits, top_k, topk_method, n_group, topk_group, norm_topk_prob,
            routed_scaling_factor, e_score_correction_bias, num_shared,
        )  # fmt: skip
    _check(router_logits, top_k, topk_method, n_group, topk_group, e_score_correction_bias)
    parts = router_logits if router_logits.dim() == 3 else router_logits[None]
    assert parts.stride(2) == 1, "router logits rows must be contiguous"
    num_parts, num_tokens, num_experts = parts.shape
    n_group, topk_group = (1, 1) if topk_method == "greedy" else (n_group, topk_group)
    group_size = num_experts // n_group
    width = top_k + num_shared
    device = router_logits.device
    ids = torch.empty((num_tokens, width), dtype=torch.int32, device=device)
    weights = torch.empty((num_tokens, width), dtype=torch.float32, device=device)
    if num_tokens == 0:
        return weights, ids
    bias = router_logits if e_score_correction_bias is None else e_score_correction_bias
    _select_experts_kernel[(num_tokens,)](
        parts, bias, ids, weights, parts.stride(1), parts.stride(0), num_experts, group_size,
        float(routed_scaling_factor),
        METHOD=topk_method, N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
        NUM_SHARED=num_shared, NORM=bool(norm_topk_prob), NUM_PARTS=num_parts,
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_S=triton.next_power_of_2(group_size),
        BLOCK_OUT=triton.next_power_of_2(width), **pdl_launch(router_logits),
        num_warps=1,  # reductions within one warp: the fastest on H200 for E = 64, 256 and T = 1-4096
    )  # fmt: skip
    return weights, ids


MAX_PARTS = 16  # slices of the hidden dim router_logits_parts cuts it into, at most


@jit(do_not_specialize=["num_rows"])
def _router_parts_kernel(
    X,  # [T, H] the normed hidden states, H contiguous
    W,  # [E, H] the router weight, same dtype (a layer's constant)
    OUT,  # [P, T, E] float32: each slice of H's partial logits
    num_rows,  # T
    num_experts,  # E
    hidden,  # H
    stride_x, stride_w, stride_o_p, stride_o_t,
    SPLIT: tl.constexpr,  # hidden dims per part, a multiple of BLOCK_K
    PRECISION: tl.constexpr,  # "ieee": float32 products (float32 tensors, and the interpreter)
    PDL: tl.constexpr,  # launched with launch_pdl: the first weight tile before gdc_wait
    BLOCK_T: tl.constexpr,  # rows per tile, >= 16
    BLOCK_E: tl.constexpr,  # experts per program
    BLOCK_K: tl.constexpr,  # hidden dims per iteration
):  # fmt: skip
    # one program: BLOCK_E experts' partial logits over one slice of the hidden dim, every row
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    part = tl.program_id(1)
    offs_k = part * SPLIT + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    mask_e = offs_e < num_experts
    w_ptrs = W + offs_e[:, None] * stride_w + offs_k[None, :]
    w_first = tl.load(w_ptrs, mask=mask_e[:, None] & (offs_k < hidden)[None, :], other=0.0)
    pdl_wait(PDL)
    for t0 in range(0, num_rows, BLOCK_T):
        rows = t0 + offs_t
        mask_t = rows < num_rows
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k in tl.static_range(0, SPLIT, BLOCK_K):
            mask_k = offs_k + k < hidden
            if k == 0:  # noqa: SIM108 (a constexpr branch: Triton folds it; a ternary it may not)
                w = w_first
            else:
                w = tl.load(w_ptrs + k, mask=mask_e[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(
                X + rows[:, None] * stride_x + offs_k[None, :] + k,
                mask=mask_t[:, None] & mask_k[None, :],
                other=0.0,
            )
            if PRECISION == "ieee":
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        o_ptrs = OUT + part * stride_o_p + rows[:, None] * stride_o_t + offs_e[None, :]
        tl.store(o_ptrs, acc, mask=mask_t[:, None] & mask_e[None, :])


def router_logits_parts_ref(x: Tensor, weight: Tensor, parts: int, split: int) -> Tensor:
    # reads the weight once (E * H * itemsize); float32 products, one partial sum per `split` dims of H
    xs, ws = x.float().split(split, dim=-1), weight.float().split(split, dim=-1)
    assert len(xs) == parts
    return torch.stack([xi @ wi.T for xi, wi in zip(xs, ws, strict=True)])


def _parts(hidden: int, block_k: int) -> tuple[int, int]:
    """(parts, hidden dims per part): at most MAX_PARTS slices of whole BLOCK_K tiles."""
    tiles = -(-hidden // block_k)
    per = -(-tiles // MAX_PARTS)
    return -(-tiles // per), per * block_k


def router_logits_parts(x: Tensor, weight: Tensor) -> Tensor:
    """The router's logits of a few tokens as partial sums over slices of the hidden dim: x [T, H]
    by weight [E, H] (same 16-bit or float32 dtype) -> [P, T, E] float32, P <= MAX_PARTS, whose
    sum over P is x @ weight^T in float32; `select_experts` takes it as it is and adds the parts up.
    One launch of E / 16 x P programs (a [E, H] GEMV cut along H, so that a 64-expert router still
    spreads over many multiprocessors), where cuBLAS takes one that cannot start early (no PDL)."""
    num_tokens, hidden = x.shape
    assert (
        weight.shape[1] == hidden and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1
    )
    block_k = 128 if x.is_cuda else 32
    parts, split = _parts(hidden, block_k)
    if not use_triton(x):
        return router_logits_parts_ref(x, weight, parts, split)
    num_experts = weight.shape[0]
    out = torch.empty((parts, num_tokens, num_experts), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    block_e = 16
    _router_parts_kernel[(triton.cdiv(num_experts, block_e), parts)](
        x, weight, out, num_tokens, num_experts, hidden, x.stride(0), weight.stride(0),
        out.stride(0), out.stride(1), SPLIT=split,
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32",
        BLOCK_T=16, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=4, **pdl_launch(x),
    )  # fmt: skip
    return out
