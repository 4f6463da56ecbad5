"""What changes the logits before a token is drawn: min_tokens bans, logit biases, penalties.

vLLM's order and definitions: biases are added, then the stop tokens of rows that have not
reached min_tokens are set to -inf, then the penalties apply. Penalties see the request's tokens
as the runner's token table holds them (every position ever fed to the model, prompt and
output), gathered per step for the penalized rows only:

    repetition r (prompt and output): a seen token's logit l becomes l / r if l > 0, else l * r
    frequency f (output): l -= f * (times the token was generated)
    presence p (output):  l -= p * (1 if the token was generated at all)

Counts are rebuilt each step with one scatter into a [P, V + 1] tensor (the extra column takes
positions past each row's length), not kept per request: nothing to update on preemption or
recomputation, and a step without penalized rows costs nothing. At P = 256 rows and a vocabulary
of 128k it writes 5 bytes per logit (float32 counts, bool seen): 160 MiB, about one more pass
over the logits, and scatters P x L ids for contexts of L tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_bias_and_bans(
    logits: Tensor, bias: tuple[Tensor, Tensor, Tensor] | None, bans: tuple[Tensor, Tensor] | None
) -> Tensor:
    """In place: add `bias` (rows [N], ids [N], values [N]) then set `bans` (rows [M], ids [M])
    to -inf."""
    if bias is not None:
        rows, ids, values = bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if bans is not None:
        rows, ids = bans
        logits.index_put_((rows, ids), logits.new_full(rows.shape, float("-inf")))  # no host copy
    return logits


def token_counts(history: Tensor, prompt_len: Tensor, seq_len: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """history [P, L] token ids (entries at and past seq_len are ignored) -> (seen [P, V] bool:
    anywhere in [0, seq_len); output counts [P, V] float32: in [prompt_len, seq_len))."""
    rows, length = history.shape
    pos = torch.arange(length, device=history.device)[None, :]
    ids = history.long()
    valid = (pos < seq_len[:, None]) & (ids >= 0) & (ids < vocab)
    output = valid & (pos >= prompt_len[:, None])
    spare = torch.full_like(ids, vocab)  # the extra column, dropped below
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=history.device)
    seen.scatter_(1, torch.where(valid, ids, spare), True)
    counts = torch.zeros(rows, vocab + 1, dtype=torch.float32, device=history.device)
    counts.scatter_add_(1, torch.where(output, ids, spare), output.float())
    return seen[:, :vocab], counts[:, :vocab]


def apply_penalties(
    logits: Tensor,
    seen: Tensor,
    counts: Tensor,
    repetition: Tensor,
    presence: Tensor,
    frequency: Tensor,
) -> Tensor:
    """logits [P, V] -> penalized logits [P, V] (a new tensor); per-row penalties [P]."""
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)
