"""The plain records the scheduler hands the runner (`Batch`) and gets back (`Sampled`).

They sit at the bottom of the import graph so that the engine and the runner share them without
importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
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
        # a decode run holds no request with log-probabilities (the steady set's rule)
        if any(it.params.logprobs or it.params.prompt_logprobs for it in batch.parts()[1]):
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


@dataclass(frozen=True, eq=False)
class DecodeRun:
    """Requests that each decode one token and sample, as columns ([k] arrays, numpy's from the
    scheduler's steady decode set): what k `ScheduledReq`s would say, without building them. The
    fields not here are fixed: token_ids (token,), new_kv_slots (kv_slot,), samples, no prefix,
    next_token PENDING_TOKEN."""

    slot: Any
    gen: Any
    epoch: Any
    row: Any
    start: Any  # the position computed: the request's scheduled positions before this step
    token: Any  # its token id, PENDING_TOKEN when the previous step samples it
    kv_slot: Any
    num_output: Any
    prompt_len: Any
    params: tuple[SamplingParams, ...]

    def __len__(self) -> int:
        return len(self.params)

    def item(self, i: int) -> ScheduledReq:
        return self.items(slice(i, i + 1))[0]

    def items(self, rows: slice = slice(None)) -> list[ScheduledReq]:
        """The rows as `ScheduledReq`s, built at C speed (zip, repeat, tuple.__new__)."""
        slot, gen, epoch, row, start, token, kv_slot, num_output, prompt_len = (
            _ints(c[rows])
            for c in (
                self.slot, self.gen, self.epoch, self.row, self.start, self.token, self.kv_slot,
                self.num_output, self.prompt_len,
            )
        )  # fmt: skip
        fields = zip(
            slot, gen, epoch, row, start, zip(token), zip(kv_slot), repeat(True), self.params[rows],
            num_output, repeat(()), prompt_len, repeat(PENDING_TOKEN),
        )  # fmt: skip
        return list(map(partial(tuple.__new__, ScheduledReq), fields))


def _ints(column) -> list[int]:
    return column.tolist() if hasattr(column, "tolist") else list(column)  # numpy's, or a sequence


class Items(Sequence):
    """A batch's items when a `DecodeRun` leads them: the run's rows, then `rest`. The run's
    `ScheduledReq`s are built on first use (once), so that a consumer reading the run's columns
    (the scheduler's update) never pays for them."""

    __slots__ = ("run", "rest", "_all")

    def __init__(self, run: DecodeRun, rest: tuple[ScheduledReq, ...]):
        self.run, self.rest, self._all = run, rest, None

    def _items(self) -> tuple[ScheduledReq, ...]:
        if self._all is None:
            self._all = (*self.run.items(), *self.rest)
        return self._all

    def __len__(self) -> int:
        return len(self.run) + len(self.rest)

    def __getitem__(self, i):
        return self._items()[i]

    def __iter__(self):
        return iter(self._items())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return repr(self._items())


@dataclass(frozen=True)
class Batch:
    """What the scheduler hands the runner for one step. `items` is every request's share, in
    step order (samples come back in it). With `decode` (the scheduler's steady decode set),
    `items` is an `Items` and its first len(decode) entries are that run's rows: a consumer may
    read them as columns (`parts()`), or as `ScheduledReq`s like any others."""

    items: Sequence[ScheduledReq]
    step: int
    decode: DecodeRun | None = None

    def parts(self) -> tuple[DecodeRun | None, Sequence[ScheduledReq]]:
        """(the decode run or None, the items after it)."""
        if self.decode is None:
            return None, self.items
        return self.decode, self.items.rest

    @property
    def num_tokens(self) -> int:
        run, rest = self.parts()
        return (len(run) if run is not None else 0) + sum(len(it.token_ids) for it in rest)

    @property
    def decode_only(self) -> bool:
        """Every request advances by one token: the CUDA-graph path."""
        return all(len(it.token_ids) == 1 and it.samples for it in self.parts()[1])


def sampled_rows(batch: Batch) -> tuple[list[SamplingParams], list[int], list[tuple[int, int, int]]]:
    """For each item that samples, in batch order: its params, its earlier output tokens, and its
    (row, prompt length, tokens known after the step). A decode run's are read as columns."""
    run, rest = batch.parts()
    sampled = [it for it in rest if it.samples]
    params = [it.params for it in sampled]
    num_outputs = [it.num_output for it in sampled]
    contexts = [(it.row, it.prompt_len, it.start + len(it.token_ids)) for it in sampled]
    if run is None:
        return params, num_outputs, contexts
    head = zip(_ints(run.row), _ints(run.prompt_len), _ints(run.start + 1), strict=True)
    return [*run.params, *params], [*_ints(run.num_output), *num_outputs], [*head, *contexts]


def sampling_slots(batch: Batch) -> list[int]:
    """The slot of each item that samples, in batch order."""
    run, rest = batch.parts()
    head = _ints(run.slot) if run is not None else []
    return [*head, *(it.slot for it in rest if it.samples)]


def logprob_top_k(batch: Batch) -> int:
    """The most top tokens any item of the step reports beside its own (the step's k)."""
    return max((it.params.top_logprobs for it in batch.parts()[1] if it.params.wants_logprobs), default=0)


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
