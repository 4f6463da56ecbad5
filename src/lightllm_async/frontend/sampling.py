"""Request Structs → one validated `SamplingParams`, or an `ApiError(400)`.

The three request shapes (chat, completions, native generate) differ only in names and defaults;
this module maps them onto `SamplingParams`, whose constructor is the one range check, and turns
its `InvalidParam` into a 400 that names the field as the client spelled it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from lightllm_async.types import SEED_LIMIT, TOP_K_LIMIT, InvalidParam, SamplingParams

from .limits import MAX_CONTENT_PARTS, MAX_MESSAGES
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    OpenAISampling,
    TokenizeRequest,
)


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param)


@contextmanager
def api_names(names: dict[str, str], prefix: str = "") -> Iterator[None]:
    """Turn an InvalidParam into a 400 naming the field as this API spells it."""
    try:
        yield
    except InvalidParam as e:
        name = prefix + names.get(e.param, e.param)
        raise _bad(e.message.replace(e.param, name, 1), name) from None


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    return tuple(dict.fromkeys(s for s in items if s))  # drop empties and duplicates, keep order


def _top_k(top_k: int | None) -> int:
    """-1 and 0 both mean off (vLLM); past int32 it keeps every token anyway."""
    if top_k is None or top_k in (-1, 0) or top_k >= TOP_K_LIMIT:
        return 0
    if top_k < -1:
        raise InvalidParam("top_k", f"top_k must be -1 or 0 (off) or at least 1, got {top_k}.")
    return top_k


def _seed(seed: int | None) -> int | None:
    """Any signed or unsigned 64-bit seed; a negative one names the same bits as its unsigned twin."""
    if seed is None:
        return None
    if not -(SEED_LIMIT // 2) <= seed < SEED_LIMIT:
        raise InvalidParam("seed", f"seed must be a 64-bit integer in [-2**63, 2**64), got {seed}.")
    return seed % SEED_LIMIT


def _check_n(n: int | None, param: str = "n") -> None:
    if n is not None and n != 1:
        raise _bad(f"{param} must be 1 (got {n}); several choices per request are not supported", param)


def choice_count(req: OpenAISampling, max_choices: int) -> int:
    """`n`, checked: each choice is an engine request of its own, sharing the prompt. best_of
    (draw several, return the best) is refused."""
    if req.best_of is not None and req.best_of != 1:
        raise _bad(
            f"best_of is not supported (got {req.best_of}); use n to get several choices and pick one.",
            "best_of",
        )
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_choices:
        raise _bad(f"n must be in [1, {max_choices}], got {n}.", "n")
    return n


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Each choice's record: with a seed, choice i draws with seed + i (mod 2**64), so that the
    choices differ yet the request as a whole reproduces."""
    if params.seed is None or n == 1:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % SEED_LIMIT) for i in range(n)]


def _logit_bias(bias: dict[int, float] | None, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id -> bias, as pairs; an id outside the vocabulary is a 400."""
    if not bias:
        return ()
    if vocab_size is not None:
        bad = next((t for t in bias if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad(f"logit_bias token id {bad} is out of range [0, {vocab_size}).", "logit_bias")
    return tuple((int(t), float(b)) for t, b in bias.items())


def _opt(value, default):
    return default if value is None else value


# SamplingParams field -> its name in the OpenAI APIs, where they differ
_OPENAI_NAMES = {"stop_ids": "stop_token_ids"}


COMPLETION_LOGPROBS_LIMIT = 5  # the legacy completions API's bound on `logprobs`


def _openai(
    req: OpenAISampling,
    max_tokens: int | None,
    max_tokens_name: str,
    vocab_size: int | None,
    logprobs: tuple[bool, int, str],
    prompt_logprobs: bool = False,
) -> SamplingParams:
    wanted, top, top_name = logprobs
    with api_names({**_OPENAI_NAMES, "max_new_tokens": max_tokens_name, "top_logprobs": top_name}):
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_opt(req.temperature, 1.0),
            top_p=_opt(req.top_p, 1.0),
            top_k=_top_k(req.top_k),
            min_p=_opt(req.min_p, 0.0),
            presence_penalty=_opt(req.presence_penalty, 0.0),
            frequency_penalty=_opt(req.frequency_penalty, 0.0),
            repetition_penalty=_opt(req.repetition_penalty, 1.0),
            seed=_seed(req.seed),
            ignore_eos=bool(req.ignore_eos),
            stop=_stop_strings(req.stop),
            stop_ids=tuple(dict.fromkeys(req.stop_token_ids or ())),
            min_tokens=_opt(req.min_tokens, 0),
            logit_bias=_logit_bias(req.logit_bias, vocab_size),
            logprobs=wanted,
            top_logprobs=top,
            prompt_logprobs=prompt_logprobs,
        )


def completion_params(req: CompletionRequest, vocab_size: int | None = None) -> SamplingParams:
    k = req.logprobs
    if k is not None and not 0 <= k <= COMPLETION_LOGPROBS_LIMIT:
        raise _bad(f"logprobs must be in [0, {COMPLETION_LOGPROBS_LIMIT}], got {k}.", "logprobs")
    echo_logprobs = bool(req.echo) and k is not None  # the prompt's log-probabilities too
    return _openai(
        req, req.max_tokens, "max_tokens", vocab_size, (k is not None, k or 0, "logprobs"), echo_logprobs
    )


def chat_params(req: ChatCompletionRequest, vocab_size: int | None = None) -> SamplingParams:
    logprobs = (bool(req.logprobs), _opt(req.top_logprobs, 0), "top_logprobs")
    if req.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
        return _openai(req, req.max_completion_tokens, "max_completion_tokens", vocab_size, logprobs)
    return _openai(req, req.max_tokens, "max_tokens", vocab_size, logprobs)


def generate_params(p: GenerateParameters | None) -> SamplingParams:
    """LightLLM's parameters; do_sample=False is greedy whatever the temperature."""
    p = p or GenerateParameters()
    _check_n(p.n, "parameters.n")
    _check_n(p.best_of, "parameters.best_of")
    stop, name = (p.stop, "stop") if p.stop_sequences is None else (p.stop_sequences, "stop_sequences")
    with api_names({"stop": name, "min_tokens": "min_new_tokens"}, prefix="parameters."):
        return SamplingParams(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature if p.do_sample else 0.0,
            top_p=p.top_p,
            top_k=_top_k(p.top_k),
            seed=_seed(p.seed),
            ignore_eos=p.ignore_eos,
            stop=_stop_strings(stop),
            min_tokens=p.min_new_tokens,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )


def include_usage(req: OpenAISampling) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: text content only, parts joined by newlines."""
    if not req.messages:
        raise _bad("messages must contain at least one message.", "messages")
    if len(req.messages) > MAX_MESSAGES:
        raise _bad(f"messages allows at most {MAX_MESSAGES} messages, got {len(req.messages)}.", "messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if len(content) > MAX_CONTENT_PARTS:
                raise _bad(
                    f"A message allows at most {MAX_CONTENT_PARTS} content parts, got {len(content)}.",
                    f"messages[{i}].content",
                )
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


def completion_prompt(
    req: CompletionRequest, vocab_size: int, max_model_len: int | None = None
) -> str | list[int]:
    """The prompt as text or token ids; a batch of one is unwrapped, larger batches refused.

    A token-id prompt that cannot fit `max_model_len` is refused by its length, before its ids
    are looked at one by one.
    """
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise _bad("prompt must not be empty.", "prompt")
    if max_model_len is not None and len(prompt) >= max_model_len:  # one output token must fit too
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, your request "
            f"has {len(prompt)} input tokens. Please reduce the length of the input prompt.",
            "prompt",
        )
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
