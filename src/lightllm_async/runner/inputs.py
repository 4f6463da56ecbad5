"""A step's inputs: flattened on the host, then uploaded once into buffers that every path reads.

`flatten` turns a `Batch` into flat index lists (a decode run's columns at once, other items one
by one). `InputBuffers` owns the
maximum-size device buffers for them and for the sampling metadata: a step writes its lists into a
host mirror and uploads them with one copy; the eager forward reads slices of those buffers, and
each CUDA graph was captured reading the very same slices, so a replay needs no copy of its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightllm_async.batch import PENDING_TOKEN, Batch, DecodeRun, logprob_rows, logprob_top_k, sampled_rows
from lightllm_async.kernels.mla_decode_attention import lengths_spread
from lightllm_async.models.llama import ForwardContext
from lightllm_async.runner.logprobs import LogprobPlan, plan_lists
from lightllm_async.runner.sampler import SAMPLING_FIELDS, SamplingMetadata
from lightllm_async.runner.staging import Staging


@dataclass
class FlatInputs:
    """T new tokens of B requests, S of which sample; padding rows appended by `pad_to`."""

    ids: list[int] = field(default_factory=list)  # [T] token ids, PENDING_TOKEN where not known yet
    positions: list[int] = field(default_factory=list)  # [T]
    kv_slots: list[int] = field(default_factory=list)  # [T] cache rows receiving k/v
    token_rows: list[int] = field(default_factory=list)  # [T real] each token's request-table row
    rows: list[int] = field(default_factory=list)  # [B]
    q_start: list[int] = field(default_factory=lambda: [0])  # [B + 1]
    seq_lens: list[int] = field(default_factory=list)  # [B]
    # [B] decode-only steps: the requests by seq_len, longest first (padding rows, one token, last)
    order: list[int] = field(default_factory=list)
    spread: bool = False  # with `order`: whether the lengths spread (kernels' lengths_spread)
    logits_idx: list[int] = field(default_factory=list)  # [S] tokens whose logits are sampled
    pending_pos: list[int] = field(default_factory=list)  # [P] inputs that are the last step's samples
    pending_src: list[int] = field(default_factory=list)  # [P] ... and which sample each one is
    # [C] prefix-cache hits to map into req_to_token: (row, position) <- cache slot
    prefix_rows: list[int] = field(default_factory=list)
    prefix_pos: list[int] = field(default_factory=list)
    prefix_slots: list[int] = field(default_factory=list)

    def pad_to(self, n: int, sink_slot: int, sink_row: int) -> None:
        """Append one-token rows up to n requests (a CUDA-graph bucket): each writes its k/v into
        the sink slot, which no request owns, and attends over the sink row's one entry."""
        for _ in range(len(self.rows), n):
            if self.order:
                self.order.append(len(self.rows))
            self.logits_idx.append(len(self.ids))
            self.ids.append(0)
            self.positions.append(0)
            self.kv_slots.append(sink_slot)
            self.rows.append(sink_row)
            self.q_start.append(self.q_start[-1] + 1)
            self.seq_lens.append(1)

    def pad_tokens_to(self, n: int, sink_slot: int) -> None:
        """Append padding tokens up to n (a piecewise graph's bucket) that belong to no request:
        the captured parts of the forward run them, writing their k/v into the sink slot; the
        attention and the head, which run on the real tokens only, never see them."""
        extra = n - len(self.ids)
        self.ids.extend([0] * extra)
        self.positions.extend([0] * extra)
        self.kv_slots.extend([sink_slot] * extra)


def flatten(batch: Batch, last_index: dict[int, int], order: bool = False) -> FlatInputs:
    """`last_index` maps a slot to its sample's index in the previous launch; `order`: a
    decode-only step's `FlatInputs.order`."""
    f = FlatInputs()
    run, rest = batch.parts()
    if run is not None:
        _flatten_run(f, run, last_index, order and not rest)
    for it in rest:
        n = len(it.token_ids)
        for j, tok in enumerate(it.token_ids):
            if tok == PENDING_TOKEN:
                f.pending_pos.append(len(f.ids) + j)
                f.pending_src.append(last_index[it.slot])
        f.ids.extend(it.token_ids)
        f.positions.extend(range(it.start, it.start + n))
        f.kv_slots.extend(it.new_kv_slots)
        f.token_rows.extend([it.row] * n)
        f.rows.append(it.row)
        f.q_start.append(f.q_start[-1] + n)
        f.seq_lens.append(it.start + n)
        if it.samples:
            f.logits_idx.append(f.q_start[-1] - 1)
        if it.prefix_kv_slots:  # positions [0, start), computed for another request
            f.prefix_rows.extend([it.row] * it.start)
            f.prefix_pos.extend(range(it.start))
            f.prefix_slots.extend(it.prefix_kv_slots)
    if order and rest and batch.decode_only:  # one-token items outside a decode run
        f.order = sorted(range(len(f.seq_lens)), key=lambda b: -f.seq_lens[b])
        f.spread = lengths_spread(max(f.seq_lens), sum(f.seq_lens), len(f.seq_lens))
    return f


def _flatten_run(f: FlatInputs, run: DecodeRun, last_index: dict[int, int], order: bool) -> None:
    """An empty `f` takes a decode run: one token per row, each sampled."""
    k = len(run)
    f.ids = run.token.tolist()
    pending = (run.token == PENDING_TOKEN).nonzero()[0]
    f.pending_pos = pending.tolist()
    f.pending_src = list(map(last_index.__getitem__, run.slot[pending].tolist()))
    f.positions = run.start.tolist()
    f.kv_slots = run.kv_slot.tolist()
    f.token_rows = run.row.tolist()
    f.rows = list(f.token_rows)
    f.q_start = list(range(k + 1))
    f.seq_lens = (run.start + 1).tolist()
    f.logits_idx = list(range(k))
    if order:
        f.order = np.argsort(-run.start, kind="stable").tolist()
        f.spread = lengths_spread(int(run.start.max()) + 1, int(run.start.sum()) + k, k)


@dataclass(frozen=True)
class StepInputs:
    """Device views of one step's inputs, all slices of the persistent buffers."""

    input_ids: Tensor  # [T] int64 (T counts padding rows when padded to a graph bucket)
    ctx: ForwardContext
    sampling: SamplingMetadata  # [S] rows, padding excluded
    num_samples: int
    logprobs: LogprobPlan | None = None  # when some item reports log-probabilities


class InputBuffers:
    """The one owner of the step inputs on the device, sized for the largest step.

    `load` writes a batch (padded to a CUDA-graph bucket if asked), uploads it with one copy, puts
    the previous launch's samples into PENDING_TOKEN inputs and records the new tokens' cache
    slots in req_to_token, all on the device, after the cached-prefix slots of newly admitted
    requests (at most `max_prefix_slots` a step). `context(b)` gives the views a graph of b rows
    is captured with: the same tensors `load` fills. Row `sink_row` of req_to_token starts with
    `sink_slot`: the cache entry padding rows write and read.
    """

    def __init__(
        self,
        max_tokens: int,
        max_batch: int,
        req_to_token: Tensor,
        sink_slot: int,
        sink_row: int,
        max_prefix_slots: int = 0,  # 0: one row of req_to_token
        vocab_size: int | None = None,
        order_decode_rows: bool = False,
    ):
        """`order_decode_rows`: decode-only steps' contexts carry `decode_order` (the CUDA
        runner's: its split attention kernels use it; nothing on the CPU does)."""
        self.req_to_token = req_to_token
        self.order_decode_rows = order_decode_rows
        # The token id at each position of each request row, as fed to the model: what penalties
        # count (sampler.SamplingMetadata.with_history). Written beside req_to_token, from the
        # same inputs; a step that maps positions it does not compute (a cached prefix) must
        # write their ids here too.
        self.token_table = torch.zeros_like(req_to_token)
        self.vocab_size = vocab_size
        self.sink_slot, self.sink_row = sink_slot, sink_row
        req_to_token[sink_row, 0] = sink_slot
        per_request = {
            "req_idx": (torch.int32, max_batch),
            "q_start": (torch.int32, max_batch + 1),
            "seq_lens": (torch.int32, max_batch),
            "decode_order": (torch.int32, max_batch),
            "decode_spread": (torch.int32, 1),
            # the samples' rows, then the rows of prompt log-probabilities (at most one a token)
            "logits_idx": (torch.int64, max_batch + max_tokens),
            "lp_rows": (torch.int64, max_batch + max_tokens),
            "lp_targets": (torch.int64, max_batch + max_tokens),
            "lp_samples": (torch.int64, max_batch + max_tokens),
            "pending_pos": (torch.int64, max_batch),  # at most one pending input per request
            "pending_src": (torch.int64, max_batch),
        }
        sampling = {name: (dtype, per_row * max_batch) for name, (dtype, per_row) in SAMPLING_FIELDS.items()}
        per_token = {
            "positions": (torch.int64, max_tokens),
            "kv_slots": (torch.int64, max_tokens),
            "token_rows": (torch.int64, max_tokens),
            "input_ids": (torch.int64, max_tokens),
        }
        max_prefix_slots = max_prefix_slots or req_to_token.shape[1]
        prefix = {
            "prefix_rows": (torch.int64, max_prefix_slots),
            "prefix_pos": (torch.int64, max_prefix_slots),
            "prefix_slots": (torch.int32, max_prefix_slots),
        }
        self.staging = Staging(per_request | sampling | per_token | prefix, req_to_token.device)

    @property
    def input_ids(self) -> Tensor:
        """The whole input-id buffer: graphs are captured on its leading slices."""
        return self.staging.view("input_ids", self.staging.capacity("input_ids"))

    def context(
        self,
        num_tokens: int,
        num_reqs: int,
        num_logits: int,
        decode_only: bool,
        host_seq_lens: tuple[int, ...] | None = None,
        host_q_lens: tuple[int, ...] | None = None,
    ) -> ForwardContext:
        """Views of the buffers for a step of this shape; the same memory for every step.
        The host lengths are left out only for CUDA-graph captures, whose lengths vary per replay."""
        view, ordered = self.staging.view, decode_only and self.order_decode_rows
        return ForwardContext(
            positions=view("positions", num_tokens),
            kv_slots=view("kv_slots", num_tokens),
            req_to_token=self.req_to_token,
            req_idx=view("req_idx", num_reqs),
            q_start=view("q_start", num_reqs + 1),
            seq_lens=view("seq_lens", num_reqs),
            logits_idx=view("logits_idx", num_logits),
            decode_only=decode_only,
            host_seq_lens=host_seq_lens,
            host_q_lens=host_q_lens,
            decode_order=view("decode_order", num_reqs) if ordered else None,
            decode_spread=view("decode_spread", 1) if ordered else None,
        )

    def load(
        self,
        batch: Batch,
        last_sampled: Tensor,
        last_index: dict[int, int],
        pad_to: int = 0,
        pad_tokens_to: int = 0,
    ) -> StepInputs:
        """Upload a batch; `last_sampled` [S'] and `last_index` (slot -> row) are the previous
        launch's samples, which fill its PENDING_TOKEN inputs. `pad_to`: padding requests up to
        that many (a decode graph's bucket); `pad_tokens_to`: padding tokens of no request up to
        that many (a piecewise graph's bucket), which the returned step leaves out: its
        `input_ids` and context are the real tokens'."""
        flat = flatten(batch, last_index, self.order_decode_rows)
        num_real_tokens = len(flat.ids)
        flat.pad_to(pad_to, self.sink_slot, self.sink_row)
        flat.pad_tokens_to(pad_tokens_to, self.sink_slot)
        logprobs = self._plan_logprobs(batch, flat)  # appends its rows to flat.logits_idx
        params, num_outputs, contexts = sampled_rows(batch)
        sampling = SamplingMetadata.build(
            params, num_outputs, put=self.staging.put, contexts=contexts, vocab=self.vocab_size
        )
        ids, pending_pos, pending_src = self._write(flat)
        prefix = self._write_prefix(flat)
        self.staging.upload()
        if pending_pos.numel():
            ids.index_copy_(0, pending_pos, last_sampled.index_select(0, pending_src))
        if prefix is not None:
            rows, pos, slots = prefix
            self.req_to_token[rows, pos] = slots
        t, view = num_real_tokens, self.staging.view  # padding rows come after the real tokens
        rows, positions = view("token_rows", t), view("positions", t)
        self.req_to_token[rows, positions] = view("kv_slots", t).to(torch.int32)
        self.token_table[rows, positions] = ids[:t].to(torch.int32)
        sampling = sampling.with_history(self.token_table)
        num_samples = len(params)
        num_tokens = num_real_tokens if pad_tokens_to else len(flat.ids)
        ctx = self.context(
            num_tokens,
            len(flat.rows),
            len(flat.logits_idx),
            batch.decode_only,
            tuple(flat.seq_lens),
            # a decode-only step's are all 1 and nothing reads them: not built on that hot path
            None if batch.decode_only else tuple(b - a for a, b in itertools.pairwise(flat.q_start)),
        )
        return StepInputs(
            input_ids=ids[:num_tokens],
            ctx=ctx,
            sampling=sampling,
            num_samples=num_samples,
            logprobs=logprobs,
        )

    def _plan_logprobs(self, batch: Batch, flat: FlatInputs) -> LogprobPlan | None:
        rows = logprob_rows(batch)
        if not rows:
            return None
        starts = {it.slot: q for it, q in zip(batch.items, flat.q_start, strict=False)}
        lists = plan_lists(rows, sum(it.samples for it in batch.items), starts)
        flat.logits_idx.extend(lists.pop("extra"))
        put = self.staging.put
        return LogprobPlan(
            **{name[3:]: put(name, v) for name, v in lists.items()}, top_k=logprob_top_k(batch)
        )

    def load_padding(self, num_rows: int) -> None:
        """Fill the first num_rows rows with padding only: what graph capture runs on."""
        flat = FlatInputs()
        flat.pad_to(num_rows, self.sink_slot, self.sink_row)
        flat.order = list(range(num_rows)) if self.order_decode_rows else []
        self._write(flat)
        self.staging.upload()

    def load_prefill_padding(self, num_tokens: int, singles: int = 0) -> ForwardContext:
        """A step of num_tokens padding tokens: what a piecewise capture warms up on. As many as the
        request buffers allow form prefill chunks of requests on the sink row (every position of
        which maps to the sink slot), at most a request-table row each, so that the attention runs
        on them; the rest are padding of no request. The first `singles` requests take one token
        each (a mixed step's decodes). Returns the chunks' context."""
        width, max_reqs = self.req_to_token.shape[1], self.staging.capacity("req_idx")
        self.req_to_token[self.sink_row] = self.sink_slot
        flat = FlatInputs()
        starts = [*range(min(singles, num_tokens)), *range(singles, num_tokens, width)][:max_reqs]
        for start, end in zip(starts, [*starts[1:], num_tokens], strict=True):
            n = min(width, end - start)
            flat.ids.extend([0] * n)
            flat.positions.extend(range(n))
            flat.kv_slots.extend([self.sink_slot] * n)
            flat.rows.append(self.sink_row)
            flat.q_start.append(flat.q_start[-1] + n)
            flat.seq_lens.append(n)
            flat.logits_idx.append(flat.q_start[-1] - 1)
        real = len(flat.ids)
        flat.pad_tokens_to(num_tokens, self.sink_slot)
        self._write(flat)
        self.staging.upload()
        q_lens = tuple(b - a for a, b in itertools.pairwise(flat.q_start))
        return self.context(real, len(flat.rows), len(flat.rows), False, tuple(flat.seq_lens), q_lens)

    def _write(self, flat: FlatInputs) -> tuple[Tensor, Tensor, Tensor]:
        put = self.staging.put
        put("req_idx", flat.rows)
        put("q_start", flat.q_start)
        put("seq_lens", flat.seq_lens)
        if flat.order:
            put("decode_order", flat.order)
            put("decode_spread", [int(flat.spread)])
        put("logits_idx", flat.logits_idx)
        put("positions", flat.positions)
        put("kv_slots", flat.kv_slots)
        put("token_rows", flat.token_rows)
        pending = put("pending_pos", flat.pending_pos), put("pending_src", flat.pending_src)
        return put("input_ids", flat.ids), *pending

    def _write_prefix(self, flat: FlatInputs) -> tuple[Tensor, Tensor, Tensor] | None:
        if not flat.prefix_slots:
            return None
        put = self.staging.put
        return (
            put("prefix_rows", flat.prefix_rows),
            put("prefix_pos", flat.prefix_pos),
            put("prefix_slots", flat.prefix_slots),
        )
