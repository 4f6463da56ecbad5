"""POST /tokenize and POST /detokenize in vLLM's shapes.

/tokenize takes a text `prompt` (special tokens added by default) or chat `messages` rendered by
the chat template (none added by default: the template writes them) and answers
`{"count", "max_model_len", "tokens"}`, plus `token_strs` on request. /detokenize takes
`{"tokens": [...]}` and answers `{"prompt": text}` with special tokens spelled out, so that
detokenizing what /tokenize gave returns the text.
"""

from __future__ import annotations

from .asgi import Receive, Responder, Scope, read_body
from .protocol import (
    DETOKENIZE_DECODER,
    TOKENIZE_DECODER,
    ApiError,
    DetokenizeResponse,
    TokenizeResponse,
    decode_body,
)
from .sampling import chat_messages
from .service import Service


async def tokenize(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(TOKENIZE_DECODER, await read_body(receive))
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(
            400, "Give either prompt (a text) or messages (a chat), exactly one of them.", "prompt"
        )
    if req.messages is not None:
        ids = await svc.encode_chat(
            chat_messages(req), req.add_generation_prompt, special_tokens=bool(req.add_special_tokens)
        )
    else:
        ids = await svc.encode_text(req.prompt, "prompt", special_tokens=req.add_special_tokens is not False)
    strs = svc.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    await resp.json(TokenizeResponse(len(ids), svc.max_model_len, ids, strs))


async def detokenize(svc: Service, scope: Scope, receive: Receive, resp: Responder) -> None:
    req = decode_body(DETOKENIZE_DECODER, await read_body(receive))
    vocab = svc.tokenizer.vocab_size
    if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= vocab):
        i, t = next((i, t) for i, t in enumerate(req.tokens) if not 0 <= t < vocab)
        raise ApiError(400, f"Token id {t} is out of range [0, {vocab}).", f"tokens[{i}]")
    await resp.json(DetokenizeResponse(await svc.decode_tokens(req.tokens)))
