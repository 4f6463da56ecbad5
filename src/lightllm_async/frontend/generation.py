"""One request in flight: token ids from the reader → text pieces, stop strings, abort, cleanup.

Every endpoint drives a `Generation` the same way and only formats its `Piece`s differently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from lightllm_async.types import FinishReason, SamplingParams

from .asgi import ClientDisconnected
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .protocol import ApiError, engine_dead_error
from .reader import Reader, RequestHandle

_FINISH_NAMES = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the k most likely tokens at its place."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """Text produced by `token_ids` (output tokens, in order); finish_reason on the last piece.
    `logprobs`, when the request asked for them, has one entry per token id."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Generation:
    """Reads one request's tokens, detokenizes, applies stop strings, and cleans up on exit.

    Use as `async with`: leaving the block aborts the request in the engine unless it finished.
    """

    def __init__(
        self,
        reader: Reader,
        handle: RequestHandle,
        tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_exit: Callable[[Generation], None] | None = None,
    ):
        self._reader = reader
        self._handle = handle
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._stop_ids = frozenset(params.stop_ids)
        self._min_tokens = params.min_tokens  # stop strings apply from this many tokens on (vLLM)
        self._watcher: asyncio.Task | None = None
        self._on_exit = on_exit
        self._interrupted: ApiError | None = None
        self._prompt_ids = prompt_ids
        self._logprobs: dict[int, TokenLogprob] | None = {} if params.wants_logprobs else None
        self._prompt_logprobs: dict[int, TokenLogprob] = {}  # by prompt position (prompt_logprobs)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        # for /metrics: when it started, its first token, the gap before each later token, its end
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.token_gaps: list[float] = []
        self._last_token_at = 0.0
        self.ended_at: float | None = None
        self.queue_time: float | None = None  # submit to first admission (engine's clock), once finished
        self.outcome = "abort"  # the finish reason; "abort" if the client left, "error" if it failed

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, exc_type, *_) -> None:
        self.ended_at = time.monotonic()
        if self.finish_reason is not None and exc_type is None:
            self.outcome = self.finish_reason
        elif exc_type is not None and not issubclass(exc_type, (ClientDisconnected, asyncio.CancelledError)):
            self.outcome = "error"
        if self._watcher is not None:
            self._watcher.cancel()
        if self.finish_reason is None or self._stops.stopped:
            self._reader.abort(self._handle)
        if self._on_exit is not None:
            self._on_exit(self)

    def interrupt(self, err: ApiError) -> None:
        """End the request from outside (the server is shutting down): `pieces` raises `err`."""
        self._interrupted = err
        self._handle.notify_disconnect()  # wakes the reader's wait; _interrupted is looked at first

    @property
    def handle(self) -> RequestHandle:
        return self._handle

    def watch_disconnect(self, receive) -> None:
        """Listen for the client's http.disconnect while the response is being produced."""
        self._watcher = asyncio.create_task(watch_disconnect(receive, [self._handle]))

    async def pieces(self, per_token: bool = False) -> AsyncIterator[Piece]:
        """Text as it comes: one piece per wake-up, or per token; the last has finish_reason.

        Raises ClientDisconnected, or ApiError: 503 when the engine died, 500 when it failed
        the request.
        """
        h = self._handle
        while self.finish_reason is None:
            tokens = await h.wait()
            if self._interrupted is not None:
                raise self._interrupted
            if h.disconnected:
                raise ClientDisconnected
            if h.engine_dead and h.finish_reason is None:
                if h.error is not None:  # --role router: which server failed, and how
                    raise ApiError(503, h.error)
                raise engine_dead_error(h.replica if self._reader.num_replicas > 1 else None)
            done = h.finish_reason
            if done == FinishReason.ERROR:
                if h.error is not None:  # --role router: which server failed it
                    raise ApiError(500, h.error)
                if h.source >= 0 and h.replica != h.source:  # --pd: it failed after the handoff
                    raise ApiError(
                        500,
                        f"The decode engine (replica {h.replica}) could not receive this request's KV "
                        f"from prefill engine replica {h.source}: the transfer failed or timed out.",
                    )
                raise ApiError(500, "The engine failed while processing this request.")
            if self._logprobs is not None:
                self._absorb(h.take_logprobs())
            batch = self._consume(tokens, done)
            if not batch:
                continue
            if per_token:
                for piece in batch:
                    yield piece
            else:
                yield Piece(
                    "".join(p.text for p in batch),
                    [t for p in batch for t in p.token_ids],
                    batch[-1].finish_reason,
                    None if self._logprobs is None else [e for p in batch for e in p.logprobs or ()],
                )

    async def text(self) -> str:
        """The whole output text, for non-streaming responses."""
        return (await self.output())[0]

    async def output(self) -> tuple[str, list[TokenLogprob] | None]:
        """The whole output text and, if asked for, every output token's log-probability."""
        pieces = [p async for p in self.pieces()]
        text = "".join(p.text for p in pieces)
        if self._logprobs is None:
            return text, None
        return text, [e for p in pieces for e in p.logprobs or ()]

    def _absorb(self, chunks) -> None:
        """Log-probabilities by position: the prompt's are kept in order, the output's wait for
        their tokens."""
        plen = len(self._prompt_ids)
        for c in chunks:
            for i, (chosen, ids, top) in enumerate(zip(c.chosen, c.top_ids, c.top_logprobs, strict=True)):
                q = c.start + i
                entry = TokenLogprob(-1, chosen, list(zip(ids, top, strict=True)))
                if q < plen:
                    entry.token_id = self._prompt_ids[q]
                    self._prompt_logprobs[q] = entry
                else:
                    self._logprobs[q] = entry

    def prompt_logprobs(self) -> list[TokenLogprob | tuple[int, None]]:
        """One entry per prompt token: its log-probability, or (token id, None) for the first
        token (no context) and any position the engine did not compute. Complete once the first
        output token arrived: the engine publishes a prompt's before its first token."""
        entries = self._prompt_logprobs
        return [entries.get(q) or (t, None) for q, t in enumerate(self._prompt_ids)]

    def _consume(self, tokens: list[int], done: FinishReason | None) -> list[Piece]:
        out = []
        if tokens:  # tokens that arrive together share the gap since the last arrival
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
                self.token_gaps.extend([0.0] * (len(tokens) - 1))
            else:
                self.token_gaps.extend([(now - self._last_token_at) / len(tokens)] * len(tokens))
            self._last_token_at = now
        for token in tokens:
            entry = None
            if self._logprobs is not None:
                entry = self._logprobs.pop(self.prompt_tokens + self.completion_tokens, None)
                if entry is not None:
                    entry.token_id = token
            self.completion_tokens += 1
            # A stop id is always the last token (the engine stops on it); like vLLM, not shown.
            hidden = token in self._stop_ids
            text = "" if hidden else self._detok.push((token,))
            if self.completion_tokens >= self._min_tokens:
                text = self._stops.feed(text)
            out.append(Piece(text, [token], logprobs=None if entry is None else [entry]))
            if self._stops.stopped:
                self.finish_reason = "stop"
                out[-1].finish_reason = "stop"
                self._reader.abort(self._handle)
                return out
        if done is not None:
            tail = self._stops.feed(self._detok.flush())
            self.finish_reason = "stop" if self._stops.stopped else _FINISH_NAMES[done]
            tail += self._stops.flush()
            self.cached_tokens = self._handle.cached_tokens
            self.queue_time = self._handle.queue_time
            if not out:
                out.append(Piece("", []))
            out[-1].text += tail
            out[-1].finish_reason = self.finish_reason
        return out


async def watch_disconnect(receive, handles: Sequence[RequestHandle]) -> None:
    """Wait for the client's http.disconnect, then tell every handle of its response."""
    while (await receive())["type"] != "http.disconnect":
        pass
    for handle in handles:
        handle.notify_disconnect()
