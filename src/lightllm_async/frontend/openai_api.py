"""OpenAI endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time

from .asgi import Receive, Responder, Scope, read_body
from .choices import Choices
from .generation import Piece
from .limits import MAX_CHOICES
from .logprobs import CompletionLogprobsWriter, chat_logprobs
from .protocol import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    ENCODER,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
    decode_body,
)
from .sampling import (
    chat_messages,
    chat_params,
    choice_count,
    choice_params,
    completion_params,
    completion_prompt,
    include_usage,
)
from .service import Service, request_id


def _usage(choices: Choices) -> Usage:
    prompt, completion = choices.prompt_tokens, choices.completion_tokens
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(choices.cached_tokens))


async def chat_completions(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(CHAT_DECODER, await read_body(receive))
    params = chat_params(req, svc.tokenizer.vocab_size)
    n = choice_count(req, min(MAX_CHOICES, svc.max_choices))
    prompt_ids = await svc.encode_chat(chat_messages(req))
    rid, created, model = request_id("chatcmpl"), int(time.time()), svc.model_name
    texts = svc.token_texts
    async with Choices.start(svc, prompt_ids, choice_params(params, n), "messages") as choices:
        choices.watch_disconnect(receive)
        if not req.stream:
            out = []
            for i, (text, entries) in enumerate(await choices.outputs()):
                logprobs = None if entries is None else chat_logprobs(entries, texts)
                out.append(ChatChoice(i, AssistantMessage(text), choices.gens[i].finish_reason, logprobs))
            await resp.json(ChatCompletionResponse(rid, created, model, out, _usage(choices)))
            return

        def chunk(i: int, delta: Delta, finish: str | None = None, logprobs=None) -> bytes:
            choice = ChatChunkChoice(i, delta, finish, logprobs)
            return ENCODER.encode(ChatCompletionChunk(rid, created, model, [choice]))

        def piece_chunk(i: int, p: Piece) -> bytes:
            logprobs = None if p.logprobs is None else chat_logprobs(p.logprobs, texts)
            return chunk(i, Delta(content=p.text or None), p.finish_reason, logprobs)

        await resp.start_stream()
        for i in range(n):
            await resp.event(chunk(i, Delta(role="assistant", content="")))
        await _stream(choices, resp, piece_chunk)
        if include_usage(req):
            usage = ChatCompletionChunk(rid, created, model, [], usage=_usage(choices))
            await resp.event(ENCODER.encode(usage))
        await resp.end_stream()


async def completions(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(COMPLETION_DECODER, await read_body(receive))
    params = completion_params(req, svc.tokenizer.vocab_size)
    n = choice_count(req, min(MAX_CHOICES, svc.max_choices))
    prompt = completion_prompt(req, svc.tokenizer.vocab_size, svc.max_model_len)
    prompt_ids = await svc.encode_text(prompt, "prompt") if isinstance(prompt, str) else prompt
    rid, created, model = request_id("cmpl"), int(time.time()), svc.model_name
    writers = [CompletionLogprobsWriter(svc.token_texts) for _ in range(n)]
    echo = None
    if req.echo:  # the prompt as the client wrote it, else as its ids decode
        echo = prompt if isinstance(prompt, str) else svc.tokenizer.decode(prompt_ids)
    async with Choices.start(svc, prompt_ids, choice_params(params, n), "prompt") as choices:
        choices.watch_disconnect(receive)
        if not req.stream:
            out = []
            for i, (text, entries) in enumerate(await choices.outputs()):
                if echo is not None:
                    text = echo + text
                    entries = None if entries is None else choices.gens[i].prompt_logprobs() + entries
                logprobs = None if entries is None else writers[i].write(entries)
                out.append(CompletionChoice(i, text, choices.gens[i].finish_reason, logprobs))
            await resp.json(CompletionResponse(rid, created, model, out, _usage(choices)))
            return

        def echo_chunk(i: int) -> bytes:
            """The prompt, before a choice's first piece (its log-probabilities are in by then)."""
            logprobs = (
                None if params.logprobs is False else writers[i].write(choices.gens[i].prompt_logprobs())
            )
            choice = CompletionChoice(i, echo, None, logprobs)
            return ENCODER.encode(CompletionChunk(rid, created, model, [choice]))

        def piece_chunk(i: int, p: Piece) -> bytes:
            logprobs = None if p.logprobs is None else writers[i].write(p.logprobs)
            choice = CompletionChoice(i, p.text, p.finish_reason, logprobs)
            return ENCODER.encode(CompletionChunk(rid, created, model, [choice]))

        await resp.start_stream()
        await _stream(choices, resp, piece_chunk, first=echo_chunk if echo is not None else None)
        if include_usage(req):
            usage = CompletionChunk(rid, created, model, [], usage=_usage(choices))
            await resp.event(ENCODER.encode(usage))
        await resp.end_stream()


async def _stream(choices: Choices, resp: Responder, encode, first=None) -> None:
    """One SSE event per choice and wake-up that produced text or tokens with log-probabilities,
    and one that carries the choice's finish_reason; `first(i)`, if given, is an event sent
    before choice i's first."""
    started = [first is None] * len(choices.gens)
    async for i, p in choices.pieces():
        if not started[i]:
            started[i] = True
            await resp.event(first(i))
        if p.text or p.finish_reason or p.logprobs:
            await resp.event(encode(i, p))


async def list_models(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    await resp.json(ModelList([ModelCard(svc.model_name, svc.created, svc.max_model_len)]))
