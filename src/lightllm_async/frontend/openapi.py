"""GET /openapi.json: the API described from the msgspec Structs the handlers decode and encode.

`OPERATIONS` names, for every route and method the app serves, its request Struct, its response
Struct (JSON) and its stream event Struct (SSE); `document` turns them into an OpenAPI 3.1
document whose schemas come from `msgspec.json.schema_components`, so the description cannot
drift from the wire formats. It refuses a route table that `OPERATIONS` does not match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec

import lightllm_async

from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    HealthResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Operation:
    """One route and method: what it reads, what it answers, and the errors it answers with."""

    summary: str
    request: type | None = None  # the JSON body
    response: type | None = None  # the 200 JSON body
    events: type | None = None  # the 200 SSE stream: `data: <JSON of this>` events
    stream_end: str = "then `data: [DONE]`"
    other: tuple[str, dict[str, Any]] | None = None  # a 200 that is not JSON: (media type, schema)
    errors: tuple[int, ...] = ()  # statuses answered with an error object (besides 401 and `default`)


_GENERATE_ERRORS = (400, 413, 415, 500, 503)
_BODY_ERRORS = (400, 413, 415)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/v1/chat/completions", "POST"): Operation(
        "Chat completion (OpenAI); streamed with `stream: true`",
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionChunk,
        errors=_GENERATE_ERRORS,
    ),
    ("/v1/completions", "POST"): Operation(
        "Text completion (OpenAI); streamed with `stream: true`",
        CompletionRequest,
        CompletionResponse,
        CompletionChunk,
        errors=_GENERATE_ERRORS,
    ),
    ("/v1/models", "GET"): Operation("The served model (OpenAI)", response=ModelList),
    ("/generate", "POST"): Operation(
        "Generate (LightLLM's native shape)", GenerateRequest, GenerateResponse, errors=_GENERATE_ERRORS
    ),
    ("/generate_stream", "POST"): Operation(
        "Generate, one event per token (LightLLM's native shape)",
        GenerateRequest,
        events=GenerateStreamEvent,
        stream_end="the last one with `finished: true`; no end marker",
        errors=_GENERATE_ERRORS,
    ),
    ("/tokenize", "POST"): Operation(
        "A text prompt or chat messages to token ids (vLLM's shape)",
        TokenizeRequest,
        TokenizeResponse,
        errors=_BODY_ERRORS,
    ),
    ("/detokenize", "POST"): Operation(
        "Token ids to text (vLLM's shape)", DetokenizeRequest, DetokenizeResponse, errors=_BODY_ERRORS
    ),
    ("/health", "GET"): Operation(
        "200 while the engine serves; 503 once it is gone or the server shuts down",
        response=HealthResponse,
        errors=(503,),
    ),
    ("/metrics", "GET"): Operation(
        "Prometheus metrics", other=("text/plain; version=0.0.4; charset=utf-8", {"type": "string"})
    ),
    ("/openapi.json", "GET"): Operation(
        "This document (OpenAPI 3.1)", other=("application/json", {"type": "object"})
    ),
}


def document(
    routes: Mapping[str, Iterable[str]], *, secured: bool, open_paths: Iterable[str] = ()
) -> dict[str, Any]:
    """The OpenAPI document of `routes` ({path: methods}); with `secured`, every path outside
    `open_paths` needs the bearer key and may answer 401. ValueError if `routes` and
    `OPERATIONS` disagree."""
    served = {(path, method) for path, methods in routes.items() for method in methods}
    if served != set(OPERATIONS):
        raise ValueError(
            f"routes without a description or descriptions without a route: {served ^ set(OPERATIONS)}"
        )
    types = list(
        dict.fromkeys(t for op in OPERATIONS.values() for t in (op.request, op.response, op.events) if t)
    )
    refs, schemas = msgspec.json.schema_components([ErrorResponse, *types], ref_template=REF)
    ref = dict(zip([ErrorResponse, *types], refs, strict=True))
    open_paths = frozenset(open_paths)
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in routes.items():
        for method in methods:
            locked = secured and path not in open_paths
            op = _operation(OPERATIONS[path, method], ref, locked)
            op["operationId"] = method.lower() + re.sub(r"\W+", "_", path).rstrip("_")
            paths.setdefault(path, {})[method.lower()] = op
    components: dict[str, Any] = {"schemas": schemas}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lightllm-async",
            "version": lightllm_async.__version__,
            "description": "OpenAI-compatible and LightLLM-native LLM serving. Every error is an "
            "OpenAI error object (ErrorResponse).",
        },
        "paths": paths,
        "components": components,
    }


def _operation(op: Operation, ref: dict[type, dict[str, Any]], locked: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary}
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[op.request]}}}
    ok: dict[str, Any] = {}
    if op.response is not None:
        ok["application/json"] = {"schema": ref[op.response]}
    if op.events is not None:
        ok["text/event-stream"] = {
            # the schema of one event (as OpenAPI 3.2's itemSchema, and as schemathesis reads it):
            # its `data` field is the JSON of the event Struct, or the stream's end marker
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {"type": "string", "contentMediaType": "application/json"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
                "description": f"Server-sent events, each `data: <{op.events.__name__} as JSON>`, "
                f"{op.stream_end}; an error mid-stream is a `data: <ErrorResponse as JSON>` event.",
            },
            "x-event-schema": ref[op.events],
        }
    if op.other is not None:
        media, schema = op.other
        ok[media] = {"schema": schema}
    responses = {"200": {"description": "OK", "content": ok}}
    for status in sorted({*op.errors, *((401,) if locked else ())}):
        responses[str(status)] = _error(HTTPStatus(status).phrase, ref)
    responses["default"] = _error("Any other error (404, 405, 408, 421, 431, 503, ...)", ref)
    out["responses"] = responses
    if locked:
        out["security"] = [{"bearer": []}]
    return out


def _error(description: str, ref: dict[type, dict[str, Any]]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref[ErrorResponse]}}}
