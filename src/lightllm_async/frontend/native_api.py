"""LightLLM's native endpoints: POST /generate and POST /generate_stream.

Shapes follow LightLLM's api_lightllm.py: `{"inputs", "parameters"}` in;
`{"generated_text": [text], "count_output_tokens", "finish_reason", "prompt_tokens"}` out, and a
stream of `data:{"token": {...}, "generated_text", "finished", "finish_reason", "details"}`
events, one per token, without a `[DONE]` marker. The last event also carries the whole text
in `generated_text` (as TGI does; LightLLM leaves it null).
"""

from __future__ import annotations

from .asgi import Receive, Responder, Scope, read_body
from .protocol import (
    ENCODER,
    GENERATE_DECODER,
    GenerateResponse,
    GenerateStreamEvent,
    StreamToken,
    decode_body,
)
from .sampling import generate_params
from .service import Service


async def _start(svc: Service, receive: Receive):
    req = decode_body(GENERATE_DECODER, await read_body(receive))
    params = generate_params(req.parameters)
    prompt_ids = await svc.encode_text(req.inputs, "inputs")
    return svc.start(prompt_ids, params, "inputs")


async def generate(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    async with await _start(svc, receive) as gen:
        gen.watch_disconnect(receive)
        text = await gen.text()
        await resp.json(GenerateResponse([text], gen.completion_tokens, gen.finish_reason, gen.prompt_tokens))


async def generate_stream(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    async with await _start(svc, receive) as gen:
        gen.watch_disconnect(receive)
        special = set(svc.tokenizer.all_special_ids)
        await resp.start_stream(done_marker=None, prefix=b"data:")
        parts: list[str] = []
        last_id, count = -1, 0
        async for p in gen.pieces(per_token=True):
            parts.append(p.text)
            if p.token_ids:  # a finish that came without a token repeats the last id
                last_id, count = p.token_ids[0], count + 1
            done = p.finish_reason is not None
            event = GenerateStreamEvent(
                token=StreamToken(last_id, p.text, None, last_id in special, count, gen.prompt_tokens),
                generated_text="".join(parts) if done else None,
                finished=done,
                finish_reason=p.finish_reason,
            )
            await resp.event(ENCODER.encode(event))
        await resp.end_stream()
