"""Sampling on the device for a whole batch: greedy, temperature, top-k, top-p, per-request seeds.

One sort serves top-k and top-p. Sampling uses the exponential race (argmax of p / E with
E ~ Exp(1)), which draws from p without a cumulative search. A seeded request draws its noise
from a generator keyed by (seed, output position), so its tokens do not depend on what else
shares the batch. The only host sync is the caller's single `.tolist()` of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_SEED_STRIDE = 1_000_003


def _is_greedy(p: Any) -> bool:
    return p.temperature <= 0.0 or p.top_k == 1


def sample(logits: Tensor, params: Sequence[Any], num_outputs: Sequence[int]) -> Tensor:
    """logits [S, V] float32 -> token ids [S] int64."""
    greedy_ids = logits.argmax(dim=-1)
    greedy = [_is_greedy(p) for p in params]
    if all(greedy):
        return greedy_ids
    device = logits.device
    temps = torch.tensor(
        [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device=device
    )
    probs = _filtered_probs(logits / temps[:, None], params)
    noise = _exponential_noise(probs, params, num_outputs)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(torch.tensor(greedy, device=device), greedy_ids, sampled)


def _filtered_probs(scaled: Tensor, params: Sequence[Any]) -> Tensor:
    """Softmax with tokens outside each row's top-k and top-p nucleus set to zero."""
    vocab = scaled.shape[-1]
    probs = torch.softmax(scaled, dim=-1)
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return probs
    device = scaled.device
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=device)[None, :]
    drop = rank >= torch.tensor(top_k, device=device)[:, None]
    # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > torch.tensor(top_p, device=device)[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _exponential_noise(probs: Tensor, params: Sequence[Any], num_outputs: Sequence[int]) -> Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, (p, n) in enumerate(zip(params, num_outputs, strict=True)):
        if p.seed is not None:
            gen = torch.Generator(device=probs.device).manual_seed((p.seed * _SEED_STRIDE + n) % 2**64)
            noise[row].exponential_(generator=gen)
    return noise.clamp_min_(1e-20)  # a zero draw would turn a dropped token's 0/0 into NaN
