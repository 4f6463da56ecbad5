"""`n` choices of one prompt: n engine requests started together, read together, ended together.

Each choice is a Generation of its own (a slot, its own sampling); they share the prompt, whose
KV the engine's prefix cache may share. Starting is all or nothing: when one cannot start (no
free slot), the ones started are aborted. Leaving the block aborts every unfinished choice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from lightllm_async.types import SamplingParams

from .generation import Generation, Piece, TokenLogprob, watch_disconnect


class Choices:
    """Use as `async with Choices.start(svc, prompt_ids, params_per_choice, what) as choices`."""

    def __init__(self, gens: list[Generation], stack: contextlib.AsyncExitStack):
        self.gens = gens
        self._stack = stack
        self._watcher: asyncio.Task | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, svc, prompt_ids: Sequence[int], params: list[SamplingParams], what: str):
        async with contextlib.AsyncExitStack() as stack:
            gens = [await stack.enter_async_context(svc.start(prompt_ids, p, what)) for p in params]
            choices = cls(gens, stack)
            try:
                yield choices
            finally:
                if choices._watcher is not None:
                    choices._watcher.cancel()

    def watch_disconnect(self, receive) -> None:
        """One listener for the client's http.disconnect, which ends every choice."""
        if len(self.gens) == 1:
            self.gens[0].watch_disconnect(receive)
        else:
            self._watcher = asyncio.create_task(watch_disconnect(receive, [g.handle for g in self.gens]))

    @property
    def prompt_tokens(self) -> int:
        return self.gens[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.gens)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prefix cache held for the first choice (the others share its prompt)."""
        return self.gens[0].cached_tokens

    async def outputs(self) -> list[tuple[str, list[TokenLogprob] | None]]:
        """Each choice's whole text and log-probabilities, read concurrently."""
        return await _gather([g.output() for g in self.gens])

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) as each choice produces them, interleaved."""
        if len(self.gens) == 1:
            async for p in self.gens[0].pieces():
                yield 0, p
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            try:
                async for p in gen.pieces():
                    queue.put_nowait((i, p))
            except BaseException as e:  # noqa: BLE001 - handed to the reader of the queue
                queue.put_nowait((i, e))
                return
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()


async def _gather(coros: list) -> list:
    """asyncio.gather that cancels the others when one fails (a TaskGroup before Python 3.11)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
