"""What every endpoint shares: the context, the reader, prompt encoding and request start."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from lightllm_async.types import MAX_STOP_IDS, SamplingParams

from .context import FrontendContext
from .generation import Generation
from .logprobs import TokenTexts
from .protocol import ApiError, engine_dead_error
from .reader import EngineDead, Reader
from .sampling import api_names

ENCODE_INLINE_CHARS = (
    1024  # longer prompts (~1 ms of encoding and up) are tokenized in a thread, without the GIL
)
DECODE_INLINE_TOKENS = 8192  # the same for /detokenize
RETRY_AFTER = ((b"retry-after", b"1"),)
CLOSE = ((b"connection", b"close"),)

log = logging.getLogger(__name__)


def shutting_down_error() -> ApiError:
    return ApiError(503, "The server is shutting down; retry on another instance.", headers=CLOSE)


def stopping_after_death_error() -> ApiError:
    text = "An engine process died; the server is stopping so that it restarts. Retry shortly."
    return ApiError(503, text, headers=CLOSE)


def request_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


class Service:
    """The frontend of one server process; its reader runs between lifespan startup and shutdown."""

    def __init__(self, ctx: FrontendContext):
        self.ctx = ctx
        self.tokenizer = ctx.tokenizer
        if ctx.region is None:  # --role router: the role servers' slots bound these
            self.reader = ctx.remote
            self.max_model_len, self.max_choices = ctx.max_model_len, ctx.max_choices
        else:
            self.reader = Reader(ctx.region, ctx.engine_alive, ctx.replicas_alive, ctx.pd_prefill)
            # The region's per-slot arena holds prompt + output, so it bounds the context too.
            self.max_model_len = min(ctx.max_model_len, ctx.region.spec.max_tokens_per_slot)
            self.max_choices = ctx.region.spec.num_slots  # each choice of `n` takes a slot
        self.pd_calls: dict[str, Any] = {}  # --role prefill: the router's calls in flight, by id
        self.model_name = ctx.served_model_name
        self.created = int(time.time())
        # A text of more UTF-8 bytes than this cannot fit the context, whatever its tokens.
        per_token = self.tokenizer.max_bytes_per_token
        self.max_prompt_bytes = None if per_token is None else self.max_model_len * per_token
        self.token_texts = TokenTexts(self.tokenizer)  # each token's own text, for logprobs
        self._live: set[Generation] = set()
        self._stopping: ApiError | None = None
        self.on_request_end: Callable[[Generation], None] | None = None  # the metrics' observer

    def engine_alive(self) -> bool:
        return not self.reader.dead and self.ctx.engine_alive()

    async def encode_text(self, text: str, what: str = "prompt", special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; a 400 naming `what` when its size alone rules out the context."""
        self._check_prompt_size(text, what)
        if len(text) <= ENCODE_INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode_nogil, text, add_special_tokens=special_tokens)

    def _check_prompt_size(self, text: str, what: str) -> None:
        limit = self.max_prompt_bytes
        # A character is 1 to 4 bytes: most texts are decided without encoding them.
        if limit is None or len(text) * 4 <= limit:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise ApiError(
                400,
                f"The {what} is {size} bytes of text, more than can fit this model's maximum context "
                f"length of {self.max_model_len} tokens (at most {limit} bytes: "
                f"{self.tokenizer.max_bytes_per_token} bytes per token). Please reduce the length of "
                f"the {what}.",
                what,
            )

    async def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, special_tokens: bool = False
    ) -> list[int]:
        """Render the chat template, then encode without adding special tokens by default (as
        vLLM does): the template already wrote them."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template rejects the conversation (roles, order, ...)
            raise ApiError(400, f"The chat template rejected the messages: {e}", "messages") from e
        return await self.encode_text(text, "messages", special_tokens=special_tokens)

    async def decode_tokens(self, ids: list[int]) -> str:
        """The text of token ids (known to be in the vocabulary), special tokens spelled out as
        vLLM's /detokenize does; long lists are decoded in a thread, without the GIL."""
        if len(ids) <= DECODE_INLINE_TOKENS:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return await asyncio.to_thread(self.tokenizer.decode_nogil, ids, skip_special_tokens=False)

    def start(self, prompt_ids: Sequence[int], params: SamplingParams, what: str) -> Generation:
        """Check the context, take a slot and submit; 400 too long, 503 full or engine gone."""
        with api_names({}):
            params = params.with_context(len(prompt_ids), self.max_model_len, what)
        params = self._with_eos(params)
        if self._stopping is not None:
            raise self._stopping
        if self.ctx.region is not None and not self.engine_alive():  # a router's submit says why
            raise engine_dead_error()
        try:
            handle = self.reader.submit(prompt_ids, params)
        except EngineDead as e:
            raise (ApiError(503, str(e)) if e.args else engine_dead_error()) from None
        if handle is None:
            raise ApiError(
                503,
                "The server is at capacity (every request slot is in use); retry shortly.",
                headers=RETRY_AFTER,
            )
        gen = Generation(self.reader, handle, self.tokenizer, prompt_ids, params, on_exit=self._ended)
        self._live.add(gen)
        return gen

    def _ended(self, gen: Generation) -> None:
        self._live.discard(gen)
        if log.isEnabledFor(logging.DEBUG):  # one line per request, never its text
            ttft = "-" if gen.first_token_at is None else f"{gen.first_token_at - gen.started:.3f}s"
            log.debug(
                "request %s: %d prompt tokens (%d cached), %d generated, first token %s, %.3fs in all",
                gen.outcome,
                gen.prompt_tokens,
                gen.cached_tokens,
                gen.completion_tokens,
                ttft,
                (gen.ended_at or gen.started) - gen.started,
            )
        if self.on_request_end is not None:
            self.on_request_end(gen)

    def _with_eos(self, params: SamplingParams) -> SamplingParams:
        """The client's stop token ids and, unless ignore_eos, the tokenizer's eos ids."""
        if params.ignore_eos:
            return params
        eos = self.tokenizer.eos_token_ids
        stop_ids = tuple(dict.fromkeys(params.stop_ids + tuple(eos)))
        if len(stop_ids) > MAX_STOP_IDS:
            room = MAX_STOP_IDS - len(eos)
            raise ApiError(
                400,
                f"stop_token_ids allows at most {room} ids besides the model's end-of-sequence "
                f"tokens, got {len(params.stop_ids)}.",
                "stop_token_ids",
            )
        return replace(params, stop_ids=stop_ids)

    def end_all(self, err: ApiError) -> int:
        """End every request in flight with `err`, and refuse new ones with it; returns how many."""
        self._stopping = err
        for gen in list(self._live):
            gen.interrupt(err)
        return len(self._live)
