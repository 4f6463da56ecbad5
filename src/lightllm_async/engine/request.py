"""A request as the engine sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Request:
    """One request in the engine. `slot` is its identity everywhere (shared memory, metrics).

    Schedule tokens, not phases: the request has `num_tokens` (prompt + output so far) and
    `num_computed_tokens` (those whose KV is in the cache); each step closes part of the gap.
    """

    slot: int
    gen: int
    prompt_ids: list[int]
    params: Any  # ipc.RequestParams: max_new_tokens, stop_ids, temperature, ...
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    row: int = -1  # row in the request-to-token table while running
    kv_slots: list[int] = field(default_factory=list)  # KV cache rows, one per computed position
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]
