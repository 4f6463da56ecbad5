"""OpenAI endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time

from .asgi import Receive, Responder, Scope, read_body
from .generation import Generation, Piece
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
    Usage,
    decode_body,
)
from .sampling import chat_messages, chat_params, completion_params, completion_prompt, include_usage
from .service import Service, request_id


def _usage(gen: Generation) -> Usage:
    return Usage(gen.prompt_tokens, gen.completion_tokens, gen.prompt_tokens + gen.completion_tokens)


async def chat_completions(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(CHAT_DECODER, await read_body(receive))
    params = chat_params(req, svc.tokenizer.vocab_size)
    prompt_ids = await svc.encode_chat(chat_messages(req))
    rid, created, model = request_id("chatcmpl"), int(time.time()), svc.model_name
    texts = svc.token_texts
    async with svc.start(prompt_ids, params, "messages") as gen:
        gen.watch_disconnect(receive)
        if not req.stream:
            text, entries = await gen.output()
            logprobs = None if entries is None else chat_logprobs(entries, texts)
            choice = ChatChoice(0, AssistantMessage(text), gen.finish_reason, logprobs)
            await resp.json(ChatCompletionResponse(rid, created, model, [choice], _usage(gen)))
            return

        def chunk(delta: Delta, finish: str | None = None, logprobs=None) -> bytes:
            return ENCODER.encode(
                ChatCompletionChunk(rid, created, model, [ChatChunkChoice(0, delta, finish, logprobs)])
            )

        def piece_chunk(p: Piece) -> bytes:
            logprobs = None if p.logprobs is None else chat_logprobs(p.logprobs, texts)
            return chunk(Delta(content=p.text or None), p.finish_reason, logprobs)

        await resp.start_stream()
        await resp.event(chunk(Delta(role="assistant", content="")))
        await _stream(gen, resp, piece_chunk)
        if include_usage(req):
            await resp.event(ENCODER.encode(ChatCompletionChunk(rid, created, model, [], usage=_usage(gen))))
        await resp.end_stream()


async def completions(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(COMPLETION_DECODER, await read_body(receive))
    params = completion_params(req, svc.tokenizer.vocab_size)
    prompt = completion_prompt(req, svc.tokenizer.vocab_size, svc.max_model_len)
    prompt_ids = await svc.encode_text(prompt, "prompt") if isinstance(prompt, str) else prompt
    rid, created, model = request_id("cmpl"), int(time.time()), svc.model_name
    writer = CompletionLogprobsWriter(svc.token_texts)
    async with svc.start(prompt_ids, params, "prompt") as gen:
        gen.watch_disconnect(receive)
        if not req.stream:
            text, entries = await gen.output()
            logprobs = None if entries is None else writer.write(entries)
            choice = CompletionChoice(0, text, gen.finish_reason, logprobs)
            await resp.json(CompletionResponse(rid, created, model, [choice], _usage(gen)))
            return

        def piece_chunk(p: Piece) -> bytes:
            logprobs = None if p.logprobs is None else writer.write(p.logprobs)
            choice = CompletionChoice(0, p.text, p.finish_reason, logprobs)
            return ENCODER.encode(CompletionChunk(rid, created, model, [choice]))

        await resp.start_stream()
        await _stream(gen, resp, piece_chunk)
        if include_usage(req):
            await resp.event(ENCODER.encode(CompletionChunk(rid, created, model, [], usage=_usage(gen))))
        await resp.end_stream()


async def _stream(gen: Generation, resp: Responder, encode) -> None:
    """One SSE event per wake-up that produced text or tokens with log-probabilities, and one
    that carries finish_reason."""
    async for p in gen.pieces():
        if p.text or p.finish_reason or p.logprobs:
            await resp.event(encode(p))


async def list_models(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    await resp.json(ModelList([ModelCard(svc.model_name, svc.created, svc.max_model_len)]))
