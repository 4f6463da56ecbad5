"""Sampling on the device for a whole batch: logit biases, min_tokens, penalties (penalties.py),
then greedy, temperature, top-k, top-p, min-p, seeds.

One sort serves top-k, top-p and min-p. Sampling uses the exponential race (argmax of p / E with
E ~ Exp(1)), which draws from p without a cumulative search. A seeded request's noise is a pure
function of (seed, output position, token id), hashed on the device, so its tokens do not depend
on what else shares the batch and no generator is made per request; unseeded rows draw from the
engine's generator. Biases, bans and penalties are per row too. The only host sync is the
caller's single read of the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightllm_async.runner.penalties import apply_bias_and_bans, apply_penalties, token_counts
from lightllm_async.types import GREEDY_BELOW, MAX_LOGIT_BIAS, MAX_STOP_IDS, TOP_K_LIMIT

# Fields of SamplingMetadata staged per step: device dtype, and entries per sampled row (the
# input staging sizes each section by that many times the largest batch).
SAMPLING_FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "temperature": (torch.float32, 1),
    "top_k": (torch.int64, 1),
    "top_p": (torch.float32, 1),
    "min_p": (torch.float32, 1),
    "greedy": (torch.bool, 1),
    "seeded_rows": (torch.int64, 1),  # one entry per seeded row, from here to "position"
    "seed": (torch.int64, 1),
    "position": (torch.int64, 1),
    "ban_rows": (torch.int64, MAX_STOP_IDS),  # (row, token) pairs: stop ids before min_tokens
    "ban_ids": (torch.int64, MAX_STOP_IDS),
    "bias_rows": (torch.int64, MAX_LOGIT_BIAS),  # (row, token, bias) triples
    "bias_ids": (torch.int64, MAX_LOGIT_BIAS),
    "bias_values": (torch.float32, MAX_LOGIT_BIAS),
    "pen_rows": (torch.int64, 1),  # one entry per penalized row, from here to "frequency"
    "pen_table_rows": (torch.int64, 1),
    "prompt_len": (torch.int64, 1),
    "seq_len": (torch.int64, 1),
    "repetition": (torch.float32, 1),
    "presence": (torch.float32, 1),
    "frequency": (torch.float32, 1),
}

Put = Callable[[str, Sequence[Any]], Tensor]  # (field name, host values) -> device tensor


@dataclass(frozen=True)
class SamplingMetadata:
    """How each of a batch's S sampled rows draws its token; built once per step.

    Tensors live on the device; the plain flags and lengths, known on the host, pick code paths
    without a sync. `history` ([P, max_len] token ids of the penalized rows) is added by
    `with_history` once the step's tokens are in the runner's token table.
    """

    temperature: Tensor  # [S] float32, 1.0 on greedy rows so that dividing by it is harmless
    top_k: Tensor  # [S] int64, TOP_K_LIMIT where off
    top_p: Tensor  # [S] float32, +inf where off (1.0 would drop tail tokens lost to rounding)
    min_p: Tensor  # [S] float32, 0.0 where off
    greedy: Tensor  # [S] bool
    seeded_rows: Tensor  # [K] int64, the rows that draw seeded noise
    seed: Tensor  # [K] int64, each seed's 64 bits (two's complement)
    position: Tensor  # [K] int64, the output index of the token being drawn
    ban_rows: Tensor  # [M] int64 row, ban_ids [M] token: -inf until the row's min_tokens
    ban_ids: Tensor
    bias_rows: Tensor  # [N] int64 row, bias_ids [N] token, bias_values [N] float32 added
    bias_ids: Tensor
    bias_values: Tensor
    pen_rows: Tensor  # [P] int64, the rows with a penalty
    pen_table_rows: Tensor  # [P] int64, their rows of the token table
    prompt_len: Tensor  # [P] int64
    seq_len: Tensor  # [P] int64, tokens known before the one drawn (prompt + output)
    repetition: Tensor  # [P] float32
    presence: Tensor  # [P] float32
    frequency: Tensor  # [P] float32
    all_greedy: bool
    any_filter: bool  # some sampled row uses top-k, top-p or min-p
    all_seeded: bool  # every sampled (non-greedy) row is seeded: the engine generator is not drawn
    max_seq_len: int = 0  # the longest penalized row's seq_len: the history's width
    history: Tensor | None = None  # [P, max_seq_len] token ids of the penalized rows

    @classmethod
    def build(
        cls,
        params: Sequence[Any],
        num_outputs: Sequence[int],
        put: Put | None = None,
        device: torch.device | str = "cpu",
        contexts: Sequence[tuple[int, int, int]] | None = None,
        vocab: int | None = None,
    ) -> SamplingMetadata:
        """From each row's SamplingParams and its count of earlier output tokens. `contexts`
        gives each row's (token-table row, prompt length, tokens known), which penalties need
        (a row without one is not penalized); bias and ban ids at or past `vocab` are dropped.
        `put` places a field on the device (the step's input staging); by default each is its
        own tensor."""
        if put is None:
            put = _tensor_put(torch.device(device))
        rows = _host_rows(params, num_outputs, contexts, vocab)
        sampled = [not g for g in rows["greedy"]]
        return cls(
            **{name: put(name, values) for name, values in rows.items()},
            all_greedy=not any(sampled),
            any_filter=any(
                s and (k < TOP_K_LIMIT or p != float("inf") or m > 0)
                for s, k, p, m in zip(sampled, rows["top_k"], rows["top_p"], rows["min_p"], strict=True)
            ),
            all_seeded=sum(sampled) == len(rows["seeded_rows"]),
            max_seq_len=max(rows["seq_len"], default=0),
        )

    def with_history(self, token_table: Tensor) -> SamplingMetadata:
        """The same metadata with the penalized rows' tokens gathered from `token_table`
        [rows, max_model_len] (on the device, no sync); itself when no row is penalized."""
        if not self.max_seq_len:
            return self
        history = token_table.index_select(0, self.pen_table_rows)[:, : self.max_seq_len]
        return dataclasses.replace(self, history=history)

    @property
    def any_processing(self) -> bool:
        return bool(self.ban_rows.numel() or self.bias_rows.numel() or self.max_seq_len)


def _tensor_put(device: torch.device) -> Put:
    return lambda name, values: torch.tensor(values, dtype=SAMPLING_FIELDS[name][0], device=device)


def _host_rows(params, num_outputs, contexts, vocab) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in SAMPLING_FIELDS}
    contexts = contexts or [None] * len(params)
    vocab = vocab or TOP_K_LIMIT
    for i, (p, n, ctx) in enumerate(zip(params, num_outputs, contexts, strict=True)):
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
        if n < p.min_tokens:
            banned = [t for t in p.stop_ids if t < vocab]
            rows["ban_rows"] += [i] * len(banned)
            rows["ban_ids"] += banned
        for token, bias in p.logit_bias:
            if token < vocab:
                rows["bias_rows"].append(i)
                rows["bias_ids"].append(token)
                rows["bias_values"].append(bias)
        if ctx is not None and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            table_row, prompt_len, seq_len = ctx
            rows["pen_rows"].append(i)
            rows["pen_table_rows"].append(table_row)
            rows["prompt_len"].append(prompt_len)
            rows["seq_len"].append(seq_len)
            rows["repetition"].append(p.repetition_penalty)
            rows["presence"].append(p.presence_penalty)
            rows["frequency"].append(p.frequency_penalty)
    return rows


def sample(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """logits [S, V] float32 -> token ids [S] int64. `logits` is not changed."""
    logits = processed_logits(logits, meta)
    greedy_ids = logits.argmax(dim=-1)
    if meta.all_greedy:
        return greedy_ids
    probs = torch.softmax(logits / meta.temperature[:, None], dim=-1)  # [S, V]
    if meta.any_filter:
        probs = _filtered(probs, meta)
    sampled = (probs / _exponential_noise(probs, meta)).argmax(dim=-1)
    return torch.where(meta.greedy, greedy_ids, sampled)


def processed_logits(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """The logits tokens are drawn from: biases, min_tokens bans, then penalties (vLLM's order).
    A new tensor where any of them applies; `logits` itself otherwise."""
    if not meta.any_processing:
        return logits
    logits = apply_bias_and_bans(
        logits.clone(),
        (meta.bias_rows, meta.bias_ids, meta.bias_values) if meta.bias_rows.numel() else None,
        (meta.ban_rows, meta.ban_ids) if meta.ban_rows.numel() else None,
    )
    if meta.max_seq_len:
        if meta.history is None:
            raise ValueError("penalized rows need with_history() before sampling")
        seen, counts = token_counts(meta.history, meta.prompt_len, meta.seq_len, logits.shape[-1])
        rows = logits.index_select(0, meta.pen_rows)
        penalized = apply_penalties(rows, seen, counts, meta.repetition, meta.presence, meta.frequency)
        logits.index_copy_(0, meta.pen_rows, penalized)
    return logits


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
