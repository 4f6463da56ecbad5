"""Sampling on the device for a whole batch: greedy, temperature, top-k, top-p, min-p, seeds.

One sort serves top-k, top-p and min-p. Sampling uses the exponential race (argmax of p / E with
E ~ Exp(1)), which draws from p without a cumulative search. A seeded request's noise is a pure
function of (seed, output position, token id), hashed on the device, so its tokens do not depend
on what else shares the batch and no generator is made per request; unseeded rows draw from the
engine's generator. The only host sync is the caller's single read of the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightllm_async.types import GREEDY_BELOW, TOP_K_LIMIT

# Per-row fields of SamplingMetadata and their device dtypes (the input staging declares them).
# The seeded fields have one entry per seeded row, the others one per sampled row.
SAMPLING_FIELDS: dict[str, torch.dtype] = {
    "temperature": torch.float32,
    "top_k": torch.int64,
    "top_p": torch.float32,
    "min_p": torch.float32,
    "greedy": torch.bool,
    "seeded_rows": torch.int64,
    "seed": torch.int64,
    "position": torch.int64,
}

Put = Callable[[str, Sequence[Any]], Tensor]  # (field name, host values) -> device tensor


@dataclass(frozen=True)
class SamplingMetadata:
    """How each of a batch's S sampled rows draws its token; built once per step.

    Tensors live on the device; the plain flags, known on the host, pick code paths without a sync.
    """

    temperature: Tensor  # [S] float32, 1.0 on greedy rows so that dividing by it is harmless
    top_k: Tensor  # [S] int64, TOP_K_LIMIT where off
    top_p: Tensor  # [S] float32, +inf where off (1.0 would drop tail tokens lost to rounding)
    min_p: Tensor  # [S] float32, 0.0 where off
    greedy: Tensor  # [S] bool
    seeded_rows: Tensor  # [K] int64, the rows that draw seeded noise
    seed: Tensor  # [K] int64, each seed's 64 bits (two's complement)
    position: Tensor  # [K] int64, the output index of the token being drawn
    all_greedy: bool
    any_filter: bool  # some sampled row uses top-k, top-p or min-p
    all_seeded: bool  # every sampled (non-greedy) row is seeded: the engine generator is not drawn

    @classmethod
    def build(
        cls,
        params: Sequence[Any],
        num_outputs: Sequence[int],
        put: Put | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingMetadata:
        """From each row's SamplingParams and its count of earlier output tokens. `put` places a
        field on the device (the step's input staging); by default each is its own tensor."""
        if put is None:
            put = _tensor_put(torch.device(device))
        rows = _host_rows(params, num_outputs)
        sampled = [not g for g in rows["greedy"]]
        return cls(
            **{name: put(name, values) for name, values in rows.items()},
            all_greedy=not any(sampled),
            any_filter=any(
                s and (k < TOP_K_LIMIT or p != float("inf") or m > 0)
                for s, k, p, m in zip(sampled, rows["top_k"], rows["top_p"], rows["min_p"], strict=True)
            ),
            all_seeded=sum(sampled) == len(rows["seeded_rows"]),
        )


def _tensor_put(device: torch.device) -> Put:
    return lambda name, values: torch.tensor(values, dtype=SAMPLING_FIELDS[name], device=device)


def _host_rows(params: Sequence[Any], num_outputs: Sequence[int]) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in SAMPLING_FIELDS}
    for i, (p, n) in enumerate(zip(params, num_outputs, strict=True)):
        # Below GREEDY_BELOW, logits / temperature overflows to inf and softmax gives NaN: such a
        # row is greedy here even if it did not pass through SamplingParams' own check.
        greedy = p.temperature < GREEDY_BELOW or p.top_k == 1
        rows["greedy"].append(greedy)
        rows["temperature"].append(1.0 if greedy else p.temperature)
        rows["top_k"].append(p.top_k if p.top_k > 0 and not greedy else TOP_K_LIMIT)
        rows["top_p"].append(p.top_p if p.top_p < 1.0 and not greedy else float("inf"))
        rows["min_p"].append(p.min_p if not greedy else 0.0)
        if p.seed is not None and not greedy:
            rows["seeded_rows"].append(i)
            rows["seed"].append(p.seed - 2**64 if p.seed >= 2**63 else p.seed)
            rows["position"].append(n)
    return rows


def sample(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """logits [S, V] float32 -> token ids [S] int64."""
    greedy_ids = logits.argmax(dim=-1)
    if meta.all_greedy:
        return greedy_ids
    probs = torch.softmax(logits / meta.temperature[:, None], dim=-1)  # [S, V]
    if meta.any_filter:
        probs = _filtered(probs, meta)
    sampled = (probs / _exponential_noise(probs, meta)).argmax(dim=-1)
    return torch.where(meta.greedy, greedy_ids, sampled)


def _filtered(probs: Tensor, meta: SamplingMetadata) -> Tensor:
    """Tokens outside each row's top-k, top-p nucleus or min-p floor set to probability 0."""
    vocab = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=probs.device)[None, :]
    sorted_probs = sorted_probs.masked_fill(rank >= meta.top_k[:, None], 0.0)
    # top-p applies to what top-k kept (the order of HF and vLLM): keep the smallest prefix whose
    # mass reaches top_p of the kept mass, i.e. each token whose predecessors hold less than that.
    # The first token always stays (its predecessors hold 0), so a row never loses every token.
    mass = sorted_probs.cumsum(dim=-1)
    drop = mass - sorted_probs >= meta.top_p[:, None] * mass[:, -1:]
    drop |= sorted_probs < meta.min_p[:, None] * sorted_probs[:, :1]
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))


def _exponential_noise(probs: Tensor, meta: SamplingMetadata) -> Tensor:
    """E ~ Exp(1) per [row, token]: hashed for seeded rows, the engine generator's for the rest."""
    noise = torch.empty_like(probs)
    if not meta.all_seeded:
        noise.exponential_()
    if meta.seeded_rows.numel():
        u = seeded_uniform(meta.seed, meta.position, probs.shape[-1])  # [K, V]
        noise.index_copy_(0, meta.seeded_rows, u.log_().neg_())
    # exponential_ may return 0, which would turn a dropped token's 0 / 0 into NaN.
    return noise.clamp_min_(1e-20)


# -- counter-based noise ----------------------------------------------------------------------
# splitmix64 (Steele, Lea, Flood 2014) in int64 tensors: multiplication wraps modulo 2**64 as
# unsigned arithmetic would; right shifts are made logical by masking the sign-extended bits.

_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's increment between positions (odd)
_TOKEN_GAMMA = 0xD1B54A32D192ED03 - 2**64  # another odd constant, between token ids
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_UNIFORM_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1)


def _shift_right(x: Tensor, k: int) -> Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 (a bijection of the 64 bits); returns a new tensor."""
    x = x ^ _shift_right(x, 30)
    x *= _MIX1
    x ^= _shift_right(x, 27)
    x *= _MIX2
    x ^= _shift_right(x, 31)
    return x


def seeded_uniform(seed: Tensor, position: Tensor, vocab: int) -> Tensor:
    """[K] int64 seeds and output positions -> [K, vocab] float32 uniforms in (0, 1).

    Entry [i, v] depends on (seed[i], position[i], v) alone. Mixing the seed before adding the
    position keeps seed s at position n + 1 from repeating seed s + gamma at position n."""
    key = mix64(mix64(seed) + position * _GAMMA)  # [K]
    tokens = torch.arange(vocab, dtype=torch.int64, device=seed.device) * _TOKEN_GAMMA
    bits = _shift_right(mix64(key[:, None] + tokens[None, :]), 64 - _UNIFORM_BITS)  # [K, V]
    return bits.float().add_(0.5).mul_(2.0**-_UNIFORM_BITS)
