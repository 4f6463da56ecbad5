"""Continuous batching over a token-level KV cache. Plain Python: no torch, tested on the CPU.

Each step the scheduler gives running requests their next tokens (one for decode, a chunk for a
prefill that is still catching up), then admits waiting requests while the token budget and the
KV capacity allow. Admission reserves the peak a request is expected to reach; when the guess
proves wrong and the cache runs dry, the newest request is preempted and recomputed later.

With the prefix cache (engine/radix_cache.py), an admitted request reuses the KV of its longest
cached prefix and starts computing after it; cached slots that no running request uses count as
free capacity, evicted when the pool runs short and before anything is preempted.

Requests that decode one token a step join the steady decode set (engine/decode_set.py), whose
numpy columns schedule and update all of them at once; without numpy every request goes one by
one, with the same outcome.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from lightllm_async.batch import (
    PENDING_TOKEN,
    Batch,
    DecodeRun,
    Items,
    Sampled,
    ScheduledReq,
    max_prefix_slots,
)
from lightllm_async.engine.kv_manager import KVManager
from lightllm_async.engine.kv_pool import RowPool
from lightllm_async.engine.request import Request
from lightllm_async.types import PROMPT_LOGPROB_TOKENS_PER_STEP, FinishReason

try:
    import numpy as np

    from lightllm_async.engine.decode_set import DecodeSet, NoRoom
except ImportError:  # no numpy: the scheduler still runs, one request at a time
    DecodeSet = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_cache_tokens: int
    # Output length assumed at admission for requests whose max_new_tokens is larger, until
    # LEARN_AFTER requests have finished; then the LEARN_QUANTILE of the recent output lengths.
    expected_output_tokens: int = 256
    learn_output_tokens: bool = True
    enable_prefix_cache: bool = True
    # Prompt positions with log-probabilities (echo) computed in one step: each needs a row of
    # logits ([n, vocab] float32), which a whole prefill chunk of them would make too large.
    max_prompt_logprob_tokens: int = PROMPT_LOGPROB_TOKENS_PER_STEP
    # Keep steadily decoding requests as arrays (engine/decode_set.py). Off: one request at a
    # time throughout, the reference the set is tested against.
    decode_set: bool = True


class OutputLengths:
    """What admission expects a request to generate, learned from those that finished (as
    LightLLM's router does): the LEARN_QUANTILE of the last WINDOW output lengths once LEARN_AFTER
    are known, the configured guess before. An overestimate leaves KV capacity idle; an
    underestimate costs preemptions (counted), which recompute and so stay correct."""

    WINDOW = 512
    LEARN_AFTER = 32
    LEARN_QUANTILE = 0.9

    def __init__(self, initial: int, learn: bool):
        self.learn = learn
        self.recent: deque[int] = deque(maxlen=self.WINDOW)
        self._expected = initial

    def observe(self, length: int) -> None:
        if not self.learn:
            return
        self.recent.append(length)
        if len(self.recent) >= self.LEARN_AFTER and len(self.recent) % 8 == 0:  # sort now and then
            ordered = sorted(self.recent)
            self._expected = max(1, ordered[int(self.LEARN_QUANTILE * (len(ordered) - 1))])

    @property
    def expected(self) -> int:
        return self._expected


@dataclass(frozen=True)
class Finished:
    """A request that left: it ended for `reason`, or (--pd, reason NONE) it was handed off to a
    decode replica with the KV slots of its computed positions in `handoff_kv`, which stay the
    request's (in `Scheduler.handing_off`) until `release_handoff` once they were sent."""

    request: Request
    reason: FinishReason
    handoff_kv: tuple[int, ...] = ()


class Scheduler:
    """Owns the waiting and running queues and the KV pools; exchanges plain records with the runner."""

    def __init__(self, cfg: SchedulerConfig):
        if cfg.kv_cache_tokens < cfg.max_model_len:
            raise ValueError(
                f"KV cache of {cfg.kv_cache_tokens} tokens cannot hold one request of "
                f"max_model_len={cfg.max_model_len}"
            )
        self.cfg = cfg
        self.kv = KVManager(cfg.kv_cache_tokens, cfg.enable_prefix_cache)
        self.tokens = self.kv.tokens
        self.rows = RowPool(cfg.max_running_requests)
        self.max_prefix_slots = max_prefix_slots(cfg.max_model_len, cfg.max_num_batched_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the newest
        self.by_slot: dict[int, Request] = {}
        self.num_steps = 0
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up at first admission
        self.prefix_hit_tokens = 0  # ... and found in the cache
        self.output_lengths = OutputLengths(cfg.expected_output_tokens, cfg.learn_output_tokens)
        self.first_admitted: list[Request] = []  # admitted for the first time since the engine looked
        # prompts that running requests are computing and have not cached yet: prompt key -> count
        self._prompts_in_prefill: dict[int, int] = {}
        self._logprob_budget = cfg.max_prompt_logprob_tokens  # what is left of it in this step
        # --pd, a prefill engine: requests handed off whose KV is still being sent (it stays theirs)
        self.handing_off: list[Request] = []
        use_set = cfg.decode_set and DecodeSet is not None
        self.decode = DecodeSet(cfg.max_running_requests, cfg.max_model_len) if use_set else None

    # -- requests in and out ------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.by_slot[req.slot] = req
        if self.kv.cache.enabled and KVManager.shares_prefix(req):
            req.prompt_key = hash(tuple(req.prompt_ids))
        self.waiting.append(req)

    def add_transferred(self, req: Request, kv_slots: list[int]) -> None:
        """--pd, a decode replica: `req` arrives with the KV of its positions [0, num_tokens - 1)
        already in `kv_slots` (taken from the pool by `kv.allocate`). They join the prefix cache,
        locked for `req` until its admission, which then finds them all as a cached prefix: the
        same path as a prefix-cache hit, and the last known token is computed as usual."""
        n = len(kv_slots)
        held, node = self.kv.cache.insert(req.token_ids(0, n), kv_slots)
        self.tokens.free(kv_slots[:held])  # the tree had those positions already
        if node is not None:
            self.kv.cache.lock(node)
        req.held_node = node
        self.add(req)

    def _unhold(self, req: Request) -> None:
        if req.held_node is not None:
            self.kv.cache.unlock(req.held_node)
            req.held_node = None

    def abort(self, slot: int) -> Request | None:
        """Drop a request wherever it is; returns it, or None if it is not here."""
        req = self.by_slot.get(slot)
        if req is not None:
            self._retire(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_free_tokens(self) -> int:
        """KV capacity not held by running requests: free slots and evictable cached ones."""
        return self.kv.num_free

    # -- schedule -------------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """The next step's work. May run while the previous step is still in flight (its sampled
        tokens pending): those requests then decode their pending token. A suspect request (one
        that was in a failed step) runs alone until it samples a token."""
        suspect = self._next_suspect()
        if suspect is not None:
            return self._schedule_alone(suspect)
        budget = self.cfg.max_num_batched_tokens
        self._logprob_budget = self.cfg.max_prompt_logprob_tokens
        items: list[ScheduledReq] = []
        run = self._schedule_steady(budget)
        if run is not None:
            budget -= len(run)
        members = len(self.decode) if self.decode is not None else 0
        for req in self.running[members:]:  # a copy: preemption changes the list
            if budget == 0:
                break
            if req.row < 0 or self._will_finish_by_length(req):
                continue  # preempted by an earlier iteration (no row), or its pending token is its last
            n = self._room(req, budget)
            if n == 0 or (self.tokens.num_free < n and not self._make_room(n, req)):
                continue  # nothing to do, or req itself was preempted (free slots in the pool: no need)
            items.append(self._take(req, n))
            budget -= n
        prefix_room = self.max_prefix_slots
        while budget > 0 and self.waiting and not self.waiting[0].suspect:
            req = self.waiting[0]
            if self._room(req, budget) == 0 or not self._admit(req, prefix_room):
                break
            prefix_room -= req.num_cached
            n = self._room(req, budget)
            items.append(self._take(req, n))
            budget -= n
        return self._batch(items, run)

    def _schedule_steady(self, budget: int) -> DecodeRun | None:
        """The steady decode set's tokens, ahead of the other items: first the running requests
        after the set's last member that have become steady join it (in order: the set is the
        head of `running`). When the pool cannot hold its tokens the set is dissolved for this
        step and everyone goes one by one, preempting as needed."""
        d = self.decode
        if d is None:
            return None
        running = self.running
        while len(d) < len(running) and d.steady(running[len(d)]):
            d.join(running[len(d)])
        if budget == 0 or not len(d):
            return None
        try:
            return d.schedule(budget, self.kv)
        except NoRoom:
            d.leave_all()
            return None

    def _room(self, req: Request, budget: int) -> int:
        """Tokens to schedule for `req` now: what it has left, within the step's budget, and
        within its log-probabilities' room (the ring's limit, the step's prompt-logprob rows)."""
        n = min(self._unscheduled(req), budget)
        if req.logprob_limit is not None:  # the chunk writes positions up to start + n
            n = min(n, req.logprob_limit - 1 - req.num_scheduled_tokens)
        if self._prompt_logprob_rows(req):
            n = min(n, self._logprob_budget)
        return max(n, 0)

    @staticmethod
    def _prompt_logprob_rows(req: Request) -> bool:
        """The request's next chunk computes prompt positions' log-probabilities (a logits row each)."""
        return req.params.prompt_logprobs and req.num_scheduled_tokens < len(req.prompt_ids)

    def _batch(self, items: list[ScheduledReq], run: DecodeRun | None = None) -> Batch | None:
        if run is not None:
            self.num_steps += 1
            return Batch(items=Items(run, tuple(items)), step=self.num_steps, decode=run)
        if not items:
            return None
        self.num_steps += 1
        return Batch(items=tuple(items), step=self.num_steps)

    def _admit(self, req: Request, prefix_room: int) -> bool:
        """Admit a waiting request if a row, the KV capacity and the step's room for cached
        prefixes allow; it reuses its cached prefix. False if it has to wait."""
        if self.rows.num_free == 0 or req.num_pending:  # a preempted request's token is in flight
            return False
        if (
            req.prompt_key is not None
            and not req.prompt_cached
            and req.prompt_key in self._prompts_in_prefill
        ):
            return False  # a running request is computing this very prompt: wait, then reuse it (n > 1)
        hit, pinned = self.kv.probe(req)
        if hit > prefix_room or not self._fits(req, hit, pinned):
            return False
        self.waiting.remove(req)  # the head, but for a suspect
        req.row = self.rows.allocate()
        self.running.append(req)
        hit = self.kv.acquire_prefix(req)
        self._unhold(req)
        if req.prompt_key is not None and hit < len(req.prompt_ids) - 1:  # others may wait for it
            self._prompts_in_prefill[req.prompt_key] = self._prompts_in_prefill.get(req.prompt_key, 0) + 1
            req.computing_prompt = True
        if req.cached_tokens is None:  # first admission: what the client's prompt found
            req.cached_tokens = hit
            self.first_admitted.append(req)
            if self.kv.cache.enabled:
                self.prefix_queried_tokens += len(req.prompt_ids)
                self.prefix_hit_tokens += hit
        return True

    @staticmethod
    def _unscheduled(req: Request) -> int:
        return req.num_tokens + req.num_pending - req.num_scheduled_tokens

    def _will_finish_by_length(self, req: Request) -> bool:
        """A pending token that reaches a length limit ends the request: don't feed it."""
        if req.num_pending == 0:
            return False
        outputs = len(req.output_ids) + req.num_pending
        if req.handoff_to >= 0:  # its first token is its last here
            return True
        return (
            outputs >= req.params.max_new_tokens or req.num_tokens + req.num_pending >= self.cfg.max_model_len
        )

    def _take(self, req: Request, n: int) -> ScheduledReq:
        # once per running request per step: the attribute reads are kept few (scheduler_bench)
        kv_slots = req.kv_slots
        start = len(kv_slots)  # req.num_scheduled_tokens
        prefix = tuple(kv_slots) if req.map_prefix else ()
        req.map_prefix = False
        slots = self.kv.allocate(n)
        kv_slots.extend(slots)
        num_output = len(req.output_ids) + req.num_pending
        prompt_len = len(req.prompt_ids)
        samples = start + n == prompt_len + num_output
        prompt_logprobs = req.params.prompt_logprobs
        if prompt_logprobs and start < prompt_len:  # rows of prompt logprobs
            self._logprob_budget -= n
        item = ScheduledReq(
            req.slot,
            req.gen,
            req.num_preemptions,
            req.row,
            start,
            tuple(req.token_ids(start, start + n)),
            tuple(slots),
            samples,
            req.params,
            num_output,
            prefix,
            prompt_len,
            req.token_ids(start + n, start + n + 1)[0] if prompt_logprobs and not samples else PENDING_TOKEN,
        )
        req.num_pending += samples
        return item

    def _make_room(self, n: int, req: Request) -> bool:
        """Preempt the newest requests until `n` token slots are free (evictable cached ones
        count: a preempted request's computed tokens join them); False if `req` went."""
        while self.kv.num_free < n:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        if req.decode_set is not None:
            self.decode.leave(req)
        self.running.remove(req)
        self._release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Back to the head of the queue, ahead of requests that arrived later.
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival < req.arrival:
            pos += 1
        self.waiting.insert(pos, req)

    def _prompt_done(self, req: Request) -> None:
        """`req` no longer computes its prompt for others: cached, preempted or gone."""
        if req.computing_prompt:
            req.computing_prompt = False
            left = self._prompts_in_prefill[req.prompt_key] - 1
            if left:
                self._prompts_in_prefill[req.prompt_key] = left
            else:
                del self._prompts_in_prefill[req.prompt_key]

    def _release(self, req: Request) -> None:
        self._prompt_done(req)
        self.kv.release(req)
        if req.row >= 0:
            self.rows.free(req.row)
            req.row = -1

    def _peak(self, req: Request) -> int:
        remaining = req.params.max_new_tokens - len(req.output_ids)
        expected = min(remaining, self.output_lengths.expected)
        return min(req.num_tokens + max(expected, 1), self.cfg.max_model_len)

    def _fits(self, req: Request, hit: int, pinned: int) -> bool:
        """Room for `req`'s peak beside the peaks the running requests are expected to reach; a
        hit of `hit` cached tokens, `pinned` of them now evictable, needs that many fewer slots
        but takes those from the free capacity."""
        members = len(self.decode) if self.decode is not None else 0
        reserved = self.decode.reserved(self.output_lengths.expected) if members else 0
        reserved += sum(max(self._peak(r) - len(r.kv_slots), 0) for r in self.running[members:])
        return self.kv.num_free - pinned - reserved >= self._peak(req) - hit

    # -- failure isolation --------------------------------------------------------------------

    def _next_suspect(self) -> Request | None:
        """A suspect to run alone: a running one, else the first waiting one, admitted here if it
        can be. None: schedule normally, suspects left waiting."""
        running = next((r for r in self.running if r.suspect), None)
        if running is not None:
            return running
        waiting = next((r for r in self.waiting if r.suspect), None)
        if waiting is None or not self._admit(waiting, self.max_prefix_slots):
            return None
        return waiting

    def _schedule_alone(self, req: Request) -> Batch | None:
        """Not overlapped: a failure then belongs to exactly one step of this request."""
        if req.num_pending:
            return None
        self._logprob_budget = self.cfg.max_prompt_logprob_tokens
        n = self._room(req, self.cfg.max_num_batched_tokens)
        if n == 0 or not self._make_room(n, req):
            return None
        return self._batch([self._take(req, n)])

    def blame(self, batch: Batch) -> Finished | None:
        """The culprit of a failed step, when there is one: a suspect that failed alone. It is
        retired; the caller reports it as an error."""
        if len(batch.items) != 1:
            return None
        item = batch.items[0]
        req = self.by_slot.get(item.slot)
        if req is None or req.gen != item.gen or not req.suspect:
            return None
        self._retire(req)
        return Finished(req, FinishReason.ERROR)

    def recover(self, batches: Iterable[Batch]) -> None:
        """Undo steps that failed or were in flight when one did: every request they held goes
        back to the queue as a suspect, its KV released (what completed steps computed stays in
        the prefix cache) and its in-flight samples forgotten (it is recomputed, which gives the
        same tokens)."""
        for batch in batches:
            for item in batch.items:
                req = self.by_slot.get(item.slot)
                if req is None or req.gen != item.gen:
                    continue
                if req in self.running:
                    self._preempt(req)
                req.num_pending = 0
                req.suspect = True

    # -- update ---------------------------------------------------------------------------------

    def update(self, batch: Batch, sampled: Sampled) -> tuple[list[tuple[int, int]], list[Finished]]:
        """Apply a finished step: advance computed counts, append sampled tokens, retire finished
        requests. Returns the (slot, token) pairs to publish and the finished requests; items of
        requests that ended (or were aborted) while the step was in flight are dropped."""
        applied: list[tuple[int, int]] = []
        finished: list[Finished] = []
        run, rest = batch.parts()
        tokens = sampled.token_ids
        if run is not None:  # every row of a decode run samples: the first len(run) tokens
            self._update_run(run, tokens[: len(run)], applied, finished)
            tokens = tokens[len(run) :]
        tokens = iter(tokens)
        for item in rest:
            self._apply(item, next(tokens) if item.samples else None, applied, finished)
        return applied, finished

    def _apply(self, item: ScheduledReq, token: int | None, applied: list, finished: list) -> None:
        """One item of a finished step, one request at a time."""
        req = self.by_slot.get(item.slot)
        if req is None or req.gen != item.gen:
            return
        if item.epoch == req.num_preemptions:
            req.num_computed_tokens += len(item.token_ids)
            if not req.prompt_cached and req.num_computed_tokens >= len(req.prompt_ids):
                self.kv.cache_prompt(req)
                self._prompt_done(req)
        if token is None:
            return
        req.suspect = False  # it sampled: whatever failed was not this request
        req.num_pending -= 1
        req.output_ids.append(token)
        if req.decode_set is not None:  # an item from before it joined the set
            self.decode.synced(req)
        applied.append((req.slot, token))
        reason = self._stop_reason(req, token)
        if reason is not FinishReason.NONE:
            self._finish(req, reason, finished)
        elif req.handoff_to >= 0 and req.row >= 0 and req.num_computed_tokens == req.num_tokens - 1:
            self._hand_off(req)
            finished.append(Finished(req, FinishReason.NONE, tuple(req.kv_slots[: req.num_computed_tokens])))

    def _finish(self, req: Request, reason: FinishReason, finished: list) -> None:
        self._retire(req)
        finished.append(Finished(req, reason))
        self.output_lengths.observe(len(req.output_ids))

    def _update_run(self, run: DecodeRun, tokens, applied: list, finished: list) -> None:
        """A decode run's tokens, applied to the members it was scheduled for in a few array
        operations; the rows that stop, and those whose request left the set since (finished,
        aborted, preempted: their tokens apply as any item's), then go one at a time in batch
        order, as they would have without the set."""
        tok = np.asarray(tokens, np.int64)
        current = self.decode.current(run)
        if current.all():
            rows, tok_now, slots = run.row, tok, run.slot
        else:
            rows, tok_now, slots = run.row[current], tok[current], run.slot[current]
        stop, length = self.decode.apply(rows, tok_now)
        applied.extend(zip(slots.tolist(), tok_now.tolist(), strict=True))
        ends = stop | length
        if current.all() and not ends.any():
            return
        index = np.flatnonzero(current)
        late = {int(i): None for i in np.flatnonzero(~current)}
        for j in np.flatnonzero(ends).tolist():
            late[int(index[j])] = FinishReason.STOP if stop[j] else FinishReason.LENGTH
        by_row = self.decode.reqs
        for i in sorted(late):
            reason = late[i]
            if reason is None:
                self._apply(run.item(i), int(tok[i]), applied, finished)
            else:
                self._finish(by_row[int(run.row[i])], reason, finished)

    def _hand_off(self, req: Request) -> None:
        """--pd: `req` leaves (its row too) but keeps its KV: locked cache path and private tail, so
        that nothing overwrites the positions while they are sent, and admission counts them used."""
        if req.decode_set is not None:  # never a member (DecodeSet.steady), but should it be
            self.decode.leave(req)
        del self.by_slot[req.slot]
        self.running.remove(req)
        self._prompt_done(req)
        self.rows.free(req.row)
        req.row = -1
        self.handing_off.append(req)

    def release_handoff(self, req: Request) -> None:
        """Its KV was sent: the computed positions go to the prefix cache, the rest to the pool."""
        self.handing_off.remove(req)
        self.kv.release(req)

    def _retire(self, req: Request) -> None:
        if req.decode_set is not None:
            self.decode.leave(req)
        del self.by_slot[req.slot]
        self._unhold(req)
        if req in self.running:
            self.running.remove(req)
            self._release(req)
        else:  # preempted while its last token was in flight
            self.waiting.remove(req)

    def _stop_reason(self, req: Request, token: int) -> FinishReason:
        # Before min_tokens the sampler bans the stop ids; a runner that does not is held to it
        # here, as vLLM's stop check is.
        if token in req.params.stop_ids and len(req.output_ids) >= req.params.min_tokens:
            return FinishReason.STOP
        if len(req.output_ids) >= req.params.max_new_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.cfg.max_model_len:
            return FinishReason.LENGTH
        return FinishReason.NONE
