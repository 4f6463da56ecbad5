"""Steps with prefill chunks replayed from CUDA graphs captured in pieces, cut at each attention.

A decode-only step replays one graph (cuda_graph.py). A step with prefill chunks cannot: its
attention depends on host values (how many requests, how many new tokens each, how long their
contexts are). Everything else in the forward (the embedding, projections, norms, rope and the
KV store, the MLP or MoE, the all-reduces) depends only on the number of tokens. So the forward
is captured at bucketed token counts, cut where it calls attention (`ForwardContext.attend`):
graph 0 runs up to layer 0's attention, which copies its inputs into static buffers and ends the
graph; the attention runs eagerly on the step's real tokens and leaves its output in a static
buffer, which graph 1 reads; and so on. The last graph ends with the final norm's output, and
the head runs eagerly on the rows that sample. A step of T real tokens is padded to its bucket
with tokens of no request (`FlatInputs.pad_tokens_to`): the captured parts run them, writing their
k/v into the sink slot; the attention and the head never see them.

Without this, a mixed step of a MoE model is bound by the host: ~1,600 kernel launches from
Python for ~21 ms of GPU work took 52 ms on an H200 (perf/RESULTS.md, DeepSeek-V2-Lite shape).
The graphs share the decode graphs' memory pool. Attention's static buffers (its inputs and its
output, [max tokens, ...] each) are shared by every layer and bucket: a layer's attention reads
them and writes its output before the next graph runs, in stream order. The output rows of the
padding tokens are never written by the attention; they hold what an earlier step left there
(finite values: zeros at first, then real outputs), which the padding rows carry harmlessly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightllm_async.models.llama import ForwardContext

log = logging.getLogger(__name__)


def token_buckets(max_tokens: int, smallest: int = 128) -> list[int]:
    """Token counts the pieces are captured at: every 128 up to 2048, every 256 up to 4096, every
    512 above, and max_tokens itself. A step pads to the next one: less than 1/8 more tokens
    than it has from 1024 tokens on, where an 8B model's GEMMs are compute-bound and padding
    costs its share (on an H200, 100 decodes + a 1024-token prompt padded to 1280 took 6% longer
    than eagerly; DeepSeek-V2-Lite's MoE GEMMs 10% longer); below, a step's time is mostly reading
    the weights, which padding does not add to."""
    sizes, n = [], smallest
    while n < max_tokens:
        sizes.append(n)
        n += 128 if n < 2048 else 256 if n < 4096 else 512
    return sizes + [max_tokens]


@dataclass(frozen=True)
class Cut:
    """One attention between two graphs: `fn(*inputs, ctx, *args)` over the real tokens' rows of
    the static `inputs` [bucket, ...], its result copied into the static `out` [bucket, ...]."""

    fn: Callable[..., Tensor]
    args: tuple
    inputs: tuple[Tensor, ...]
    out: Tensor

    def run(self, ctx: ForwardContext) -> None:
        t = ctx.positions.shape[0]  # the step's real tokens, first in the bucket
        self.out[:t].copy_(self.fn(*(x[:t] for x in self.inputs), ctx, *self.args))


class StaticBuffers:
    """The attention's inputs and outputs, one buffer per (role, trailing shape, dtype) sized for
    the largest bucket, zeroed once; a bucket uses its leading rows."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.max_tokens, self.device = max_tokens, device
        self._bufs: dict[tuple, Tensor] = {}

    def get(self, role: str, tail: tuple[int, ...], dtype: torch.dtype, rows: int) -> Tensor:
        key = (role, tuple(tail), dtype)
        if key not in self._bufs:
            self._bufs[key] = torch.zeros((self.max_tokens, *tail), dtype=dtype, device=self.device)
        return self._bufs[key][:rows]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


class EagerPieces:
    """The cut as a padded step runs it without graphs: the inputs copied into the static buffers,
    the attention over the real tokens' rows, its output in the static buffer. What a capture
    warms up with, and what tests on the CPU check a padded step against (the same copies and
    slices as a replay, with the forward's other parts run in line)."""

    def __init__(self, bufs: StaticBuffers, real: ForwardContext):
        self.bufs, self.real = bufs, real

    def __call__(self, fn, inputs: tuple[Tensor, ...], out_tail: tuple[int, ...], args: tuple) -> Tensor:
        cut = _static_cut(self.bufs, fn, inputs, out_tail, args)
        cut.run(self.real)
        return cut.out


def _static_cut(bufs: StaticBuffers, fn, inputs, out_tail, args) -> Cut:
    rows = inputs[0].shape[0]
    static = []
    for j, x in enumerate(inputs):
        buf = bufs.get(f"in{j}", x.shape[1:], x.dtype, rows)
        buf.copy_(x)
        static.append(buf)
    out = bufs.get("out", out_tail, inputs[0].dtype, rows)
    return Cut(fn, args, tuple(static), out)


def run_padded(
    forward: Callable[[ForwardContext], Tensor],
    bufs: StaticBuffers,
    padded: ForwardContext,
    real: ForwardContext,
) -> Tensor:
    """`forward(ctx)` over a padded step with its attention cut as a replay cuts it: the
    forward's own parts read `padded` (all tokens), the attention `real` (the real tokens)."""
    return forward(dataclasses.replace(padded, cut=EagerPieces(bufs, real)))


class _Capture:
    """The cut during a capture: the input copies end the graph being captured, the next one
    begins; the attention itself is not run (its static output is what the next graph reads)."""

    def __init__(self, bufs: StaticBuffers, pool):
        self.bufs, self.pool = bufs, pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[Cut] = []

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def __call__(self, fn, inputs, out_tail, args) -> Tensor:
        cut = _static_cut(self.bufs, fn, inputs, out_tail, args)
        self.end()
        self.cuts.append(cut)
        self.begin()
        return cut.out


@dataclass(frozen=True)
class Pieces:
    """One bucket's graphs, one more than its cuts."""

    graphs: list[torch.cuda.CUDAGraph]
    cuts: list[Cut]


class PiecewiseEager:
    """Steps with prefill chunks run as a piecewise replay runs them, with the graphs' parts run
    in line: padded to a token bucket, the attention cut through the static buffers. Where the
    device has no graphs (the CPU), this is what tests run the runner's piecewise path with;
    `PiecewiseGraphs` warms up its captures with it."""

    def __init__(self, model, kv, inputs, max_tokens: int, buckets: list[int] | None = None):
        self.model, self.kv, self.inputs = model, kv, inputs
        self.buckets = buckets or token_buckets(max_tokens)
        if self.buckets[-1] > inputs.staging.capacity("positions"):
            raise ValueError(f"token bucket {self.buckets[-1]} is larger than the step buffers")
        device = inputs.req_to_token.device
        self.bufs = StaticBuffers(self.buckets[-1], device)
        self.hidden = torch.zeros(
            (self.buckets[-1], model.cfg.hidden_size), dtype=model.embed.weight.dtype, device=device
        )

    def bucket_for(self, num_tokens: int) -> int | None:
        """The bucket a step of num_tokens pads to, or None (more tokens than any)."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    def _forward(self, bucket: int, ctx: ForwardContext) -> Tensor:
        return self.model.hidden_states(self.inputs.input_ids[:bucket], ctx, self.kv)

    def padded(self, ctx: ForwardContext, bucket: int) -> ForwardContext:
        """`ctx` with the positions and cache slots of all `bucket` tokens, padding included:
        what the captured parts read."""
        view = self.inputs.staging.view
        return dataclasses.replace(
            ctx, positions=view("positions", bucket), kv_slots=view("kv_slots", bucket)
        )

    @torch.inference_mode()
    def replay(self, bucket: int, ctx: ForwardContext) -> Tensor:
        """The final hidden states [T, H] of a step that `InputBuffers.load(..., pad_tokens_to=
        bucket)` has just uploaded; `ctx` is its (real tokens') context."""
        x = run_padded(lambda c: self._forward(bucket, c), self.bufs, self.padded(ctx, bucket), ctx)
        self.hidden[:bucket].copy_(x)  # where a replay leaves it, padding rows included
        return self.hidden[: ctx.positions.shape[0]]


class PiecewiseGraphs(PiecewiseEager):
    """Piecewise graphs of `model.hidden_states` at every token bucket, all reading `inputs`, in
    the memory pool `pool` (the decode graphs')."""

    def __init__(self, model, kv, inputs, max_tokens: int, pool, buckets: list[int] | None = None):
        super().__init__(model, kv, inputs, max_tokens, buckets)
        self.pool = pool
        self.pieces: dict[int, Pieces] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        start, base = time.perf_counter(), torch.cuda.memory_reserved()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        num_pieces = 0
        with torch.cuda.stream(stream):
            # The attention between the pieces runs eagerly on each step's own requests: compile
            # now what a mixed step launches there (decodes through the decode kernel, a short chunk
            # through the prefill kernel's small blocks), not in the middle of serving.
            t = self.buckets[0]
            real = self.inputs.load_prefill_padding(t, singles=min(3, t - 1))
            run_padded(lambda c: self._forward(t, c), self.bufs, self.padded(real, t), real)
            for t in reversed(self.buckets):
                real = self.inputs.load_prefill_padding(t)  # padding chunks: the attention runs on them
                padded = self.padded(real, t)
                run_padded(lambda c, t=t: self._forward(t, c), self.bufs, padded, real)  # compiles, warms up
                rec = _Capture(self.bufs, self.pool)
                rec.begin()
                self.hidden[:t].copy_(self._forward(t, dataclasses.replace(padded, cut=rec)))
                rec.end()
                self.pieces[t] = Pieces(rec.graphs, rec.cuts)
                num_pieces = len(rec.graphs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info(
            "captured piecewise CUDA graphs for steps with prefill at %d token counts (%d..%d), %d "
            "pieces each, in %.1f s: %.1f MiB (%.1f MiB of attention buffers)",
            len(self.pieces),
            self.buckets[0],
            self.buckets[-1],
            num_pieces,
            time.perf_counter() - start,
            (torch.cuda.memory_reserved() - base) / 2**20,
            self.bufs.nbytes / 2**20,
        )

    @torch.inference_mode()  # the static buffers are inference tensors (made under capture)
    def replay(self, bucket: int, ctx: ForwardContext) -> Tensor:
        pieces = self.pieces[bucket]
        for graph, cut in zip(pieces.graphs, pieces.cuts, strict=False):
            graph.replay()
            cut.run(ctx)
        pieces.graphs[-1].replay()
        return self.hidden[: ctx.positions.shape[0]]
