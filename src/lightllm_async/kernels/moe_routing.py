"""DeepSeek's expert routing: router logits -> each token's top-k experts and their weights, on the
device with no host sync (plain PyTorch: a handful of small ops on [T, E])."""

from __future__ import annotations

import torch
from torch import Tensor

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


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


def select_experts(
    router_logits: Tensor,
    top_k: int,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each token's experts: router_logits [T, E] -> (topk_weights [T, top_k] float32, topk_ids
    [T, top_k] int64), in no particular order within a row.

    greedy (DeepSeek-V2): softmax scores, the top_k best. group_limited_greedy (V2): softmax scores;
    only the experts of the topk_group groups with the highest best score compete. noaux_tc (V3, R1):
    sigmoid scores; the scores plus e_score_correction_bias [E] choose the groups (each scored by the
    sum of its two best) and the experts, while the unbiased scores weight the chosen ones.
    Then, as in DeepSeek-V3 (and transformers' V3), the weights are divided by their sum when
    norm_topk_prob and always multiplied by routed_scaling_factor. DeepSeek-V2's own code skips the
    factor when it normalizes (transformers' V2 never normalizes); the released V2 checkpoints set
    norm_topk_prob false, where all agree. A V2 model with norm_topk_prob true passes factor 1.0.
    """
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {topk_method!r} is not one of {TOPK_METHODS}")
    num_tokens, num_experts = router_logits.shape
    assert 1 <= top_k <= num_experts, f"top_k {top_k} with {num_experts} experts"
    grouped = topk_method != "greedy"
    if grouped:
        assert n_group and topk_group and num_experts % n_group == 0 and topk_group <= n_group, (
            f"{topk_method} needs n_group dividing {num_experts} and topk_group <= n_group"
        )
    logits = router_logits.float()

    if topk_method == "noaux_tc":
        if e_score_correction_bias is None:
            raise ValueError("noaux_tc needs e_score_correction_bias")
        assert e_score_correction_bias.shape == (num_experts,)
        scores = logits.sigmoid()
        choice = scores + e_score_correction_bias.float()
        keep = _group_mask(choice, n_group, topk_group, "top2_sum")
        choice = choice.masked_fill(~keep, float("-inf"))
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        if grouped:
            choice = scores.masked_fill(~_group_mask(scores, n_group, topk_group, "max"), 0.0)
    topk_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)

    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids
