"""Wire formats of the HTTP API as msgspec Structs, and the errors they answer with.

Requests: OpenAI chat/completions and LightLLM's native `/generate`. Unknown fields are accepted
and ignored; everything the server acts on is typed, so msgspec rejects mistyped input before a
handler sees it. Range checks live in `sampling.py`.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import msgspec
from msgspec import Struct


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        error_type: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = error_type or _ERROR_TYPES.get(status, "internal_error")
        self.headers = headers
        self.code = code  # OpenAI's word for the error ("invalid_api_key"); the status when None


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    431: "invalid_request_error",
    503: "service_unavailable",
    500: "internal_error",
}


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None
    code: int | str  # the HTTP status, as vLLM writes it, or OpenAI's code where one exists


class ErrorResponse(Struct):
    """Every error the server answers, whatever the route: OpenAI's error object."""

    error: ErrorInfo


def error_body(err: ApiError) -> ErrorResponse:
    return ErrorResponse(ErrorInfo(err.message, err.type, err.param, err.code or err.status))


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]*)`")


def decode_error(exc: msgspec.MsgspecError) -> ApiError:
    """A 400 for a body msgspec could not decode; `param` is the offending field's path."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, f"Request body is not valid JSON: {text}")
    at, missing = _PATH_RE.search(text), _MISSING_RE.search(text)
    path = [p for p in (at and at.group(1), missing and missing.group(1)) if p]
    return ApiError(400, text, ".".join(path) or None)


def engine_dead_error(replica: int | None = None) -> ApiError:
    """503: the engine is gone; with `replica`, the engine replica that ran the request (--dp)."""
    if replica is None:
        return ApiError(503, "The engine is not running; the server cannot serve requests.")
    return ApiError(
        503, f"Engine replica {replica}, which ran this request, died; the server is stopping to restart."
    )


def decode_body(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.MsgspecError as e:
        raise decode_error(e) from None
    except RecursionError:  # msgspec's guard against deep nesting, at the interpreter's limit
        raise ApiError(
            400,
            "Request body is not valid JSON: it is nested more deeply than the limit "
            f"(about {sys.getrecursionlimit()} levels).",
        ) from None


# ---------------------------------------------------------------- requests


class StreamOptions(Struct, forbid_unknown_fields=False):
    include_usage: bool | None = None


class OpenAISampling(Struct, kw_only=True, forbid_unknown_fields=False):
    """Fields shared by chat and text completions. `None` means "not given"."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None  # refused unless 1
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None  # JSON keys are token ids written as strings


class ContentPart(Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None


class ChatMessage(Struct, forbid_unknown_fields=False):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=False):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=False):
    # str, or token ids, or a one-element batch of either; checked in sampling.completion_prompt
    prompt: str | list[Any]
    logprobs: int | None = None  # the legacy API's count of top tokens (0..5)
    echo: bool | None = None  # the prompt before the completion (with logprobs: the prompt's too)


class GenerateParameters(Struct, forbid_unknown_fields=False):
    """LightLLM's `parameters`; do_sample=False is greedy whatever the temperature."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_sequences: str | list[str] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    best_of: int = 1
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class GenerateRequest(Struct, forbid_unknown_fields=False):
    inputs: str
    parameters: GenerateParameters | None = None


class TokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's two tokenize shapes in one Struct: a text `prompt`, or chat `messages` rendered by
    the chat template; exactly one of them (checked by the handler)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (vLLM)
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    tokens: list[int]
    model: str | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(Struct):
    content: str
    role: str = "assistant"


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(Struct):
    """Chat's log-probability of one output token, and the most likely tokens at its place."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprobEntry] | None


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


# Chunks omit `usage` unless it is set; `object` is a msgspec tag so it is always written.
class ChatCompletionChunk(Struct, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Struct):
    """The legacy completions shape: one entry per token in each list (null for a prompt's
    first token, which has no context); top_logprobs maps token text to log-probability and
    holds the token itself beside the most likely ones; text_offset is each token's offset in
    the choice's text."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: str = "text_completion"


class CompletionChunk(Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Struct):
    id: str
    created: int
    max_model_len: int
    object: str = "model"
    owned_by: str = "lightllm-async"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class GenerateResponse(Struct):
    generated_text: list[str]
    count_output_tokens: int
    finish_reason: str | None
    prompt_tokens: int


class StreamToken(Struct):
    id: int
    text: str
    logprob: float | None
    special: bool
    count_output_tokens: int
    prompt_tokens: int


class GenerateStreamEvent(Struct):
    token: StreamToken
    generated_text: str | None
    finished: bool
    finish_reason: str | None
    details: None = None


class TokenizeResponse(Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs: the vocabulary's spelling


class DetokenizeResponse(Struct):
    prompt: str


class HealthResponse(Struct):
    """/health's body: an empty object while the engine serves."""


# msgspec Decoders are reusable and thread-safe; one per request type.
CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
GENERATE_DECODER = msgspec.json.Decoder(GenerateRequest)
TOKENIZE_DECODER = msgspec.json.Decoder(TokenizeRequest)
DETOKENIZE_DECODER = msgspec.json.Decoder(DetokenizeRequest)
ENCODER = msgspec.json.Encoder()
