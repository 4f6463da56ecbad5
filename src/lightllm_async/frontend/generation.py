"""One request in flight: token ids from the reader → text pieces, stop strings, abort, cleanup.

Every endpoint drives a `Generation` the same way and only formats its `Piece`s differently.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from lightllm_async.types import FinishReason, SamplingParams

from .asgi import ClientDisconnected
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .protocol import ApiError, engine_dead_error
from .reader import Reader, RequestHandle

_FINISH_NAMES = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass
class Piece:
    """Text produced by `token_ids` (output tokens, in order); finish_reason on the last piece."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


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
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
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

    def watch_disconnect(self, receive) -> None:
        """Listen for the client's http.disconnect while the response is being produced."""
        self._watcher = asyncio.create_task(_watch_disconnect(receive, self._handle))

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
                raise engine_dead_error()
            done = h.finish_reason
            if done == FinishReason.ERROR:
                raise ApiError(500, "The engine failed while processing this request.")
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
                )

    async def text(self) -> str:
        """The whole output text, for non-streaming responses."""
        return "".join([p.text async for p in self.pieces()])

    def _consume(self, tokens: list[int], done: FinishReason | None) -> list[Piece]:
        out = []
        for token in tokens:
            self.completion_tokens += 1
            # A stop id is always the last token (the engine stops on it); like vLLM, not shown.
            hidden = token in self._stop_ids
            text = "" if hidden else self._detok.push((token,))
            if self.completion_tokens >= self._min_tokens:
                text = self._stops.feed(text)
            out.append(Piece(text, [token]))
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
            if not out:
                out.append(Piece("", []))
            out[-1].text += tail
            out[-1].finish_reason = self.finish_reason
        return out


async def _watch_disconnect(receive, handle: RequestHandle) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    handle.notify_disconnect()
