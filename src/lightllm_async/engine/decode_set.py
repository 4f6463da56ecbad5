"""The steady decode set: running requests that decode one token a step, kept as numpy columns.

Most of a busy step is requests that each feed one token and sample the next. Doing their
bookkeeping one Python object at a time cost ~3 µs a request a step (perf/RESULTS.md, issue 10);
here it is a few numpy operations over all of them: `schedule` picks their positions, allocates
their KV slots in one call and gives a `DecodeRun` (the batch's first rows, as columns);
`update` applies their sampled tokens and finds the ones that stop. Per-request Python is left to
what is rare: a request joining or leaving the set, finishing, or an item gone stale.

Members are always the head of the scheduler's running list (`running[:len(set)]`, in the same
order), so a step's items come in the same order and take the same budget and KV slots as they
would one by one. A member's `num_pending` and `num_computed_tokens` live here (the `Request`
properties read them by row); its `kv_slots` and `output_ids` stay its own lists, appended in
place. Everything else the columns hold is a copy, taken when it joins: the scheduler changes
none of it while the request is a member, and takes it out of the set before anything that could.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from lightllm_async.batch import PENDING_TOKEN, DecodeRun
from lightllm_async.engine.kv_manager import KVManager
from lightllm_async.engine.request import Request
from lightllm_async.types import MAX_STOP_IDS

_NO_STOP = -2  # pads a member's row of stop ids: no token equals it


def _append_each(lists, values) -> None:
    """lists[i].append(values[i]) for all i, at C speed."""
    deque(map(list.append, lists, values), maxlen=0)


class NoRoom(Exception):
    """The pool cannot hold this step's decode tokens even after evicting cached prefixes: the
    caller goes one request at a time, preempting as it always has."""


class DecodeSet:
    """Columns indexed by the request-table row (each running request has its own), and `rows`:
    the members' rows in running order."""

    def __init__(self, max_rows: int, max_model_len: int):
        self.max_model_len = max_model_len

        def column() -> np.ndarray:
            return np.zeros(max_rows, np.int64)

        self.pending, self.computed = column(), column()  # the members' own counters
        # copies kept current by schedule/update: len(output_ids), len(kv_slots), the last known token
        self.nout, self.nsched, self.last = column(), column(), column()
        self.prompt_len, self.max_new, self.min_tokens = column(), column(), column()
        self.slot, self.gen, self.epoch = column(), column(), column()
        self.stops = np.full((max_rows, MAX_STOP_IDS), _NO_STOP, np.int64)
        self.member = np.zeros(max_rows, bool)
        self.reqs: list[Request | None] = [None] * max_rows
        self.kv_lists: list[list[int] | None] = [None] * max_rows
        self.out_lists: list[list[int] | None] = [None] * max_rows
        self.params: list = [None] * max_rows
        self.rows = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def steady(req: Request) -> bool:
        """Whether `req` may join: running, its prompt computed, one token a step from now on
        (one unscheduled position), and nothing that needs it seen alone (a suspect, a cached
        prefix to map, log-probabilities; --pd: a request its prefill replica hands off after its
        first token)."""
        return (
            req.row >= 0
            and req.handoff_to < 0
            and req.prompt_cached
            and not req.suspect
            and not req.map_prefix
            and req.logprob_limit is None
            and not req.params.wants_logprobs
            and req.num_tokens + req.num_pending - len(req.kv_slots) == 1
        )

    def join(self, req: Request) -> None:
        r, p, n = req.row, req.params, req.num_tokens
        self.pending[r] = req.num_pending  # read before decode_set is set: from the request
        self.computed[r] = req.num_computed_tokens
        self.nout[r] = len(req.output_ids)
        self.nsched[r] = len(req.kv_slots)
        self.last[r] = req.token_ids(n - 1, n)[0]
        self.prompt_len[r] = len(req.prompt_ids)
        self.max_new[r] = p.max_new_tokens
        self.min_tokens[r] = p.min_tokens
        self.slot[r], self.gen[r], self.epoch[r] = req.slot, req.gen, req.num_preemptions
        self.stops[r] = _NO_STOP
        self.stops[r, : len(p.stop_ids)] = p.stop_ids
        self.member[r] = True
        self.reqs[r], self.params[r] = req, p
        self.kv_lists[r], self.out_lists[r] = req.kv_slots, req.output_ids
        req.decode_set = self
        self.rows = np.append(self.rows, r)

    def leave(self, req: Request) -> None:
        """`req` goes back to per-request bookkeeping: its counters return to the request."""
        r = req.row
        req.decode_set = None
        req.num_pending, req.num_computed_tokens = int(self.pending[r]), int(self.computed[r])
        self.member[r] = False
        self.reqs[r] = self.kv_lists[r] = self.out_lists[r] = self.params[r] = None
        self.rows = self.rows[self.rows != r]

    def leave_all(self) -> None:
        for r in self.rows.tolist():
            self.leave(self.reqs[r])

    def synced(self, req: Request) -> None:
        """A member's item from before it joined appended a token: refresh the copies."""
        r = req.row
        self.nout[r], self.last[r] = len(req.output_ids), req.output_ids[-1]

    def reserved(self, expected: int) -> int:
        """KV slots the members are expected to take beyond what they hold: the sum of
        Scheduler._peak(req) - len(req.kv_slots), at least 0 each, for an expected output length."""
        rows = self.rows
        nout = self.nout[rows]
        more = np.maximum(np.minimum(self.max_new[rows] - nout, expected), 1)
        peak = np.minimum(self.prompt_len[rows] + nout + more, self.max_model_len)
        return int(np.maximum(peak - self.nsched[rows], 0).sum())

    # -- a step ---------------------------------------------------------------------------------

    def schedule(self, budget: int, kv: KVManager) -> DecodeRun | None:
        """The next token of each member, in order, up to `budget` of them; members whose
        pending token is their last (a length limit) get none. NoRoom if the KV capacity, cached
        prefixes evicted, cannot hold them all."""
        rows = self.rows
        pending = self.pending[rows]
        num_output = self.nout[rows] + pending
        ends = (pending > 0) & (
            (num_output >= self.max_new[rows]) | (self.prompt_len[rows] + num_output >= self.max_model_len)
        )
        if ends.any():
            go = ~ends
            rows, pending, num_output = rows[go], pending[go], num_output[go]
        if len(rows) > budget:
            rows, pending, num_output = rows[:budget], pending[:budget], num_output[:budget]
        n = len(rows)
        if n == 0:
            return None
        if kv.num_free < n:
            raise NoRoom
        slots = kv.allocate_each(n)
        picked = rows.tolist()
        _append_each(map(self.kv_lists.__getitem__, picked), slots)
        start = self.nsched[rows]
        self.nsched[rows] = start + 1
        self.pending[rows] = pending + 1
        return DecodeRun(
            slot=self.slot[rows],
            gen=self.gen[rows],
            epoch=self.epoch[rows],
            row=rows,
            start=start,
            token=np.where(pending > 0, PENDING_TOKEN, self.last[rows]),
            kv_slot=np.array(slots, np.int64),
            num_output=num_output,
            prompt_len=self.prompt_len[rows],
            params=tuple(map(self.params.__getitem__, picked)),
        )

    def current(self, run: DecodeRun) -> np.ndarray:
        """[k] bool: the run's rows whose request is still the member it was scheduled for,
        not preempted since (those apply here; the others one by one)."""
        rows = run.row
        return (
            self.member[rows]
            & (self.slot[rows] == run.slot)
            & (self.gen[rows] == run.gen)
            & (self.epoch[rows] == run.epoch)
        )

    def apply(self, rows: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members `rows` computed their position and sampled `tokens`. Returns two [k] bool
        masks: stopped by a stop id, and reached a length limit."""
        self.computed[rows] += 1
        self.pending[rows] -= 1
        nout = self.nout[rows] + 1
        self.nout[rows] = nout
        self.last[rows] = tokens
        _append_each(map(self.out_lists.__getitem__, rows.tolist()), tokens.tolist())
        stop = (self.stops[rows] == tokens[:, None]).any(axis=1) & (nout >= self.min_tokens[rows])
        length = (nout >= self.max_new[rows]) | (self.prompt_len[rows] + nout >= self.max_model_len)
        return stop, length
