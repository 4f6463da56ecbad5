"""A request as the engine sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightllm_async.batch import PENDING_TOKEN
from lightllm_async.types import SamplingParams


@dataclass(eq=False)
class Request:
    """One request in the engine. `slot` is its identity everywhere (shared memory, metrics).

    Schedule tokens, not phases: the request has `num_tokens` (prompt + output so far) and
    `num_computed_tokens` (those whose KV is in the cache); each step closes part of the gap.

    With overlapped steps, a token can be sampled on the device but not yet known here: it is
    `pending`, and the next step may already feed it to the model (as PENDING_TOKEN, which the
    runner replaces with the device-side sample). `kv_slots` counts positions scheduled, which runs
    ahead of `num_computed_tokens` while a step is in flight. A prefix-cache hit at admission
    makes the first `num_cached` positions computed without a step.
    """

    slot: int
    gen: int
    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens resolved
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    row: int = -1  # row in the request-to-token table while running
    kv_slots: list[int] = field(default_factory=list)  # KV cache rows, one per scheduled position
    # The prefix cache's share (engine/kv_manager.py): kv_slots[:num_cached] are the cache's, on the
    # path locked at cache_node; the rest are the request's own.
    num_cached: int = 0
    cache_node: object = None
    map_prefix: bool = False  # the next step maps the cached prefix into the request's table row
    prompt_cached: bool = False  # the computed prompt was offered to the cache
    cached_tokens: int | None = None  # prompt tokens the cache held at first admission (for usage)
    # With the prefix cache: hash of the prompt (None: it takes no cached prefix), and whether this
    # request is computing it while others with the same prompt wait to reuse it
    prompt_key: int | None = None
    computing_prompt: bool = False
    num_preemptions: int = 0
    suspect: bool = False  # was in a step that failed: runs alone until one of its steps succeeds
    # Positions below this may get log-probabilities now (the region's ring has room up to it; the
    # engine refreshes it each step): a request that would pass it waits. None: no limit.
    logprob_limit: int | None = None
    # --pd (engine/disagg.py). On a prefill replica: the decode replica to hand the request to once
    # its prompt is computed and its first token sampled (-1: it runs here to the end). On a decode
    # replica: the prefix-cache node of the received KV, locked until the request is admitted.
    handoff_to: int = -1
    held_node: object = None
    # While the request is in the scheduler's steady decode set (engine/decode_set.py), that set's
    # arrays hold its two step counters (the properties below read them there); else these do.
    decode_set: object = field(default=None, repr=False)
    _computed: int = field(default=0, repr=False)
    _pending: int = field(default=0, repr=False)

    @property
    def num_computed_tokens(self) -> int:
        d = self.decode_set
        return self._computed if d is None else int(d.computed[self.row])

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        d = self.decode_set
        if d is None:
            self._computed = value
        else:
            d.computed[self.row] = value

    @property
    def num_pending(self) -> int:
        """Tokens sampled by a step in flight, not yet appended to output_ids."""
        d = self.decode_set
        return self._pending if d is None else int(d.pending[self.row])

    @num_pending.setter
    def num_pending(self, value: int) -> None:
        d = self.decode_set
        if d is None:
            self._pending = value
        else:
            d.pending[self.row] = value

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Positions whose KV is computed or being computed by a step in flight."""
        return len(self.kv_slots)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output, PENDING_TOKEN past the known ones."""
        known = self.num_tokens
        if stop > known:
            return self.token_ids(start, known) + [PENDING_TOKEN] * (stop - max(start, known))
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]
