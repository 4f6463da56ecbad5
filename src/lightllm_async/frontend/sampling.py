"""Request Structs → one validated `SamplingSpec` and prompt, or an `ApiError(400)`.

The three request shapes (chat, completions, native generate) differ only in names and defaults;
everything after this module sees the same `SamplingSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    OpenAISampling,
)

_SEED_MOD = 2**63  # seeds are stored as non-negative int64; -1 means "none"


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters. max_tokens None: up to the end of the context."""

    max_tokens: int | None = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int = -1  # -1: none
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param)


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    return tuple(dict.fromkeys(s for s in items if s))  # drop empties and duplicates, keep order


def _check_n(n: int | None, param: str = "n") -> None:
    if n is not None and n != 1:
        raise _bad(f"{param} must be 1 (got {n}); several choices per request are not supported", param)


def make_spec(
    *,
    max_tokens: int | None,
    max_tokens_param: str,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    ignore_eos: bool | None,
    stop: str | list[str] | None,
    prefix: str = "",
) -> SamplingSpec:
    """Range-check sampling fields given by any API; None takes the default.

    `prefix` is prepended to field names in errors ("parameters." for /generate)."""
    if max_tokens is not None and max_tokens < 1:
        name = prefix + max_tokens_param
        raise _bad(f"{name} must be at least 1, got {max_tokens}.", name)
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise _bad(f"temperature must be a finite number >= 0, got {temperature}.", prefix + "temperature")
    if top_p is not None and not (0 < top_p <= 1):
        raise _bad(f"top_p must be in (0, 1], got {top_p}.", prefix + "top_p")
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be -1 (disable) or at least 1, got {top_k}.", prefix + "top_k")
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        # 0 means off too (vLLM); beyond int32 it keeps every token anyway
        top_k=-1 if top_k is None or top_k == 0 or top_k >= 2**31 else top_k,
        seed=-1 if seed is None else seed % _SEED_MOD,
        ignore_eos=bool(ignore_eos),
        stop=_stop_strings(stop),
    )


def openai_spec(
    req: OpenAISampling, max_tokens: int | None = None, max_tokens_param: str = "max_tokens"
) -> SamplingSpec:
    _check_n(req.n)
    return make_spec(
        max_tokens=req.max_tokens if max_tokens is None else max_tokens,
        max_tokens_param=max_tokens_param,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        stop=req.stop,
    )


def chat_spec(req: ChatCompletionRequest) -> SamplingSpec:
    if req.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
        return openai_spec(req, req.max_completion_tokens, "max_completion_tokens")
    return openai_spec(req)


def generate_spec(p: GenerateParameters | None) -> SamplingSpec:
    p = p or GenerateParameters()
    _check_n(p.n, "parameters.n")
    _check_n(p.best_of, "parameters.best_of")
    stop = p.stop_sequences if p.stop_sequences is not None else p.stop
    return make_spec(
        max_tokens=p.max_new_tokens,
        max_tokens_param="max_new_tokens",
        temperature=p.temperature if p.do_sample else 0.0,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        stop=stop,
        prefix="parameters.",
    )


def include_usage(req: OpenAISampling) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: text content only, parts joined by newlines."""
    if not req.messages:
        raise _bad("messages must contain at least one message.", "messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise _bad(
                        f"Only text content parts are supported, got type {part.type!r}.",
                        f"messages[{i}].content[{j}]",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        out.append({"role": m.role, "content": "" if content is None else content})
    return out


def completion_prompt(req: CompletionRequest, vocab_size: int) -> str | list[int]:
    """The prompt as text or token ids; a batch of one is unwrapped, larger batches refused."""
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise _bad("prompt must not be empty.", "prompt")
    if not all(type(t) is int for t in prompt):
        raise _bad(
            "prompt must be a string, a list of token ids, or a batch of one of those; "
            "batches of several prompts are not supported.",
            "prompt",
        )
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise _bad(f"Token id {bad} is out of range [0, {vocab_size}).", "prompt")
    return prompt
