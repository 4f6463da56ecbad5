"""The plain records the scheduler hands the runner (`Batch`) and gets back (`Sampled`).

They sit at the bottom of the import graph so that the engine and the runner share them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm_async.types import SamplingParams

PENDING_TOKEN = -1  # an input position whose token the previous step samples on the device


@dataclass(frozen=True)
class ScheduledReq:
    """One request's share of a step: compute positions [start, start + len(token_ids))."""

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
    prompt_len: int = 0  # the request's prompt tokens (penalties tell prompt from output by it)


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


@dataclass(frozen=True)
class Sampled:
    """What the runner hands back: one token per sampling item, in batch order."""

    token_ids: tuple[int, ...]


class DeviceFailure(RuntimeError):
    """Raised by a runner when the device itself failed (a CUDA error, the device lost): no request
    is to blame and the engine cannot go on. Any other exception from a step concerns its requests."""
