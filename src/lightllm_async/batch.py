"""The plain records the scheduler hands the runner (`Batch`) and gets back (`Sampled`).

They sit at the bottom of the import graph so that the engine and the runner share them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from lightllm_async.types import SamplingParams

PENDING_TOKEN = -1  # an input position whose token the previous step samples on the device


def max_prefix_slots(max_model_len: int, max_num_batched_tokens: int) -> int:
    """How many prefix-cache slots one step may map into request rows (`prefix_kv_slots`, summed
    over the batch): the scheduler admits within it and the runner sizes an input section by it.
    At least one whole context, and room for a step of many short suffixes behind long shared
    prefixes: 16 cached tokens per token of the step budget (a 2,000-token system prompt ahead of
    128-token questions needs 16)."""
    return max(max_model_len, 16 * max_num_batched_tokens)


class ScheduledReq(NamedTuple):
    """One request's share of a step: compute positions [start, start + len(token_ids)). A named
    tuple rather than a frozen dataclass: the scheduler builds one per running request per step,
    and a tuple is built several times faster (perf/scheduler_bench.py)."""

    slot: int
    gen: int  # with slot, names the request: a reused slot has a new generation
    epoch: int  # the request's preemption count when scheduled: a stale item computed nothing
    row: int
    start: int
    token_ids: tuple[int, ...]
    new_kv_slots: tuple[int, ...]
    samples: bool  # the chunk reaches the end of the known tokens, so a token is sampled
    params: SamplingParams
    num_output: int  # output tokens before the one this step samples (for penalties and seeds)
    # On a request's first step after admission with a prefix-cache hit: the cached KV slots of
    # positions [0, start), which the runner maps into the row before computing the new tokens.
    prefix_kv_slots: tuple[int, ...] = ()
    prompt_len: int = 0  # the request's prompt tokens (penalties tell prompt from output by it)
    # The token at position start + len(token_ids) when the chunk does not sample it but knows it
    # (the next prompt token): its log-probability comes from this chunk's last logits.
    next_token: int = PENDING_TOKEN

    def logprob_positions(self) -> range:
        """Positions whose token's log-probability this chunk computes: those its inputs predict,
        (start, start + n], where the request reports them (prompt_logprobs: from position 1;
        else only the sampled token) and the token is known or sampled here."""
        p, end = self.params, self.start + len(self.token_ids)
        if not p.wants_logprobs:
            return range(0)
        if not p.prompt_logprobs:
            return range(end, end + 1) if self.samples else range(0)
        known = self.samples or self.next_token != PENDING_TOKEN
        return range(self.start + 1, end + known)


@dataclass(frozen=True)
class LogprobRow:
    """One log-probability a step computes: of the token at `position` of request (slot, gen),
    from the logits of input `offset` of its chunk; `target` is that token, or PENDING_TOKEN
    when it is the chunk's own sample (number `sample` of the step's samples)."""

    slot: int
    gen: int
    position: int
    offset: int
    target: int
    sample: int


def logprob_rows(batch: Batch) -> list[LogprobRow]:
    """The step's log-probability rows, in the order the runner returns them: item by item,
    positions ascending. ValueError if a known position's token is not known yet. Computed
    once per batch (the runner and the engine both ask), and cheaply when no item wants any."""
    rows = batch.__dict__.get("_logprob_rows")
    if rows is None:
        if any(it.params.logprobs or it.params.prompt_logprobs for it in batch.items):
            rows = _logprob_rows(batch)
        else:
            rows = []
        batch.__dict__["_logprob_rows"] = rows  # a cache beside the frozen fields
    return rows


def _logprob_rows(batch: Batch) -> list[LogprobRow]:
    rows, sample = [], 0
    for it in batch.items:
        end = it.start + len(it.token_ids)
        for q in it.logprob_positions():
            if q == end:
                target = PENDING_TOKEN if it.samples else it.next_token
            else:
                target = it.token_ids[q - it.start]
                if target == PENDING_TOKEN:
                    raise ValueError(f"slot {it.slot}: position {q} is not known in this step")
            rows.append(LogprobRow(it.slot, it.gen, q, q - 1 - it.start, target, sample))
        sample += it.samples
    return rows


@dataclass(frozen=True)
class Batch:
    """What the scheduler hands the runner for one step."""

    items: tuple[ScheduledReq, ...]
    step: int

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)

    @property
    def decode_only(self) -> bool:
        """Every request advances by one token: the CUDA-graph path."""
        return all(len(it.token_ids) == 1 and it.samples for it in self.items)


def logprob_top_k(batch: Batch) -> int:
    """The most top tokens any item of the step reports beside its own (the step's k)."""
    return max((it.params.top_logprobs for it in batch.items if it.params.wants_logprobs), default=0)


@dataclass(frozen=True)
class StepLogprobs:
    """A step's log-probabilities, one row per `logprob_rows(batch)` entry: the token's own
    [L] float32, and the k most likely tokens [L, k] int32 with theirs [L, k] float32 (k: the
    step's largest top_logprobs). The raw model distribution: before any penalty or bias.
    The arrays are numpy's (not imported here: the scheduler's imports stay plain Python)."""

    chosen: Any
    top_ids: Any
    top_logprobs: Any


@dataclass(frozen=True)
class Sampled:
    """What the runner hands back: one token per sampling item, in batch order, and the step's
    log-probabilities when some item asked for them."""

    token_ids: tuple[int, ...]
    logprobs: StepLogprobs | None = None


class DeviceFailure(RuntimeError):
    """Raised by a runner when the device itself failed (a CUDA error, the device lost): no request
    is to blame and the engine cannot go on. Any other exception from a step concerns its requests."""
