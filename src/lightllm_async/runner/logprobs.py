"""Log-probabilities on the device: the model's own distribution (log-softmax of the raw logits,
before any bias, penalty or temperature, as vLLM reports them), of the token each row asks
about and of the k most likely tokens.

Rows come from `batch.logprob_rows`: a sampled token's row reads the logits the sampler drew
from, a prompt token's (echo) reads the logits of the position before it, which the model
computes only for requests that asked (they are appended to the step's `logits_idx`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightllm_async.batch import PENDING_TOKEN, LogprobRow


@dataclass(frozen=True)
class LogprobPlan:
    """Which rows of a step's logits [S + E, V] give which log-probabilities."""

    rows: Tensor  # [L] int64, rows of the logits: a sample's own (< S), or an extra one (>= S)
    targets: Tensor  # [L] int64, the token whose log-probability is wanted; -1: the row's sample
    samples: Tensor  # [L] int64, which sample is the token where targets is -1 (else 0)
    top_k: int


def plan_lists(rows: list[LogprobRow], num_samples: int, item_starts: dict[int, int]) -> dict[str, list]:
    """The plan's host lists, and `extra`: the flat input indices [E] whose logits the model must
    add after the samples' (`item_starts` maps each slot to its chunk's first input index)."""
    lists: dict[str, list] = {"extra": [], "lp_rows": [], "lp_targets": [], "lp_samples": []}
    for r in rows:
        own = r.target == PENDING_TOKEN
        lists["lp_rows"].append(r.sample if own else num_samples + len(lists["extra"]))
        lists["lp_samples"].append(r.sample if own else 0)
        lists["lp_targets"].append(r.target)
        if not own:
            lists["extra"].append(item_starts[r.slot] + r.offset)
    return lists


def compute_logprobs(logits: Tensor, sampled: Tensor, plan: LogprobPlan) -> tuple[Tensor, Tensor, Tensor]:
    """logits [S + E, V] float32 (raw), sampled [S] -> the chosen tokens' log-probabilities [L]
    float32, and the top-k ids [L, k] int32 and log-probabilities [L, k] float32."""
    # reads L rows of V logits twice (logsumexp, top-k): what a log_softmax pass would
    z = logits.index_select(0, plan.rows)  # [L, V]
    lse = torch.logsumexp(z, dim=-1)  # [L]
    targets = plan.targets
    if sampled.numel():
        targets = torch.where(targets >= 0, targets, sampled.index_select(0, plan.samples))
    chosen = z.gather(1, targets[:, None]).squeeze(1) - lse
    if plan.top_k:
        top, ids = z.topk(min(plan.top_k, z.shape[-1]), dim=-1)
        return chosen, ids.to(torch.int32), top - lse[:, None]
    empty = z.new_empty((z.shape[0], 0))
    return chosen, empty.to(torch.int32), empty
