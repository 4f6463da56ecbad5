"""The records every layer shares: how a request ends, and how it samples.

The bottom of the import graph (beside config.py): plain Python, no torch, no shared memory.
`SamplingParams` is the one sampling record from validation at the HTTP edge to the sampler on the
device; its `__post_init__` is the one place that checks it. The region packs its numeric fields
into a slot; the stop strings stay with the frontend, which applies them to text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum

MAX_STOP_IDS = 16  # stop token ids a request carries through the region (eos ids included)
MAX_STOP_STRINGS = 16  # stop strings per request: each one is matched on every piece of text
MAX_STOP_STRING_CHARS = 512  # characters in one stop string: the stream holds back this much text
SEED_LIMIT = 2**64  # a seed is any unsigned 64-bit integer
GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing logits by them overflows
TOP_K_LIMIT = 2**31  # top_k is stored as int32; any larger value keeps the whole vocabulary anyway
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (each crosses the region: 8 bytes)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for one bias: [-100, 100]
MAX_TOP_LOGPROBS = 20  # most likely tokens reported beside each token (OpenAI's chat limit)
# Prompt positions whose log-probabilities (echo) one step computes: each is a row of logits
PROMPT_LOGPROB_TOKENS_PER_STEP = 256
TOKEN_ID_LIMIT = 2**31  # token ids cross the region as int32


class FinishReason(IntEnum):
    NONE = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4


class InvalidParam(ValueError):
    """A sampling field out of range; `param` is the SamplingParams field name."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    `max_new_tokens` None means "up to the end of the context": `with_context` resolves it once
    the prompt length is known, before the request enters the region. temperature 0 is greedy,
    top_k 0 and top_p 1 are off, seed None draws from the engine's generator. `stop` (strings)
    never crosses the region: the frontend matches it on text.

    Until `min_tokens` tokens are out, the `stop_ids` cannot be sampled (and do not stop).
    `logit_bias` pairs (token id, bias) are added to the logits; ids the model's vocabulary
    lacks are ignored by the sampler (the frontend refuses them first). Penalties follow vLLM:
    repetition over prompt and output, presence and frequency over the output. `logprobs`
    reports each output token's log-probability and `top_logprobs` of the most likely tokens
    beside it; `prompt_logprobs` does the same for every prompt token after the first. All
    log-probabilities are the model's own (log-softmax of the raw logits, before any penalty,
    bias or temperature).
    """

    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        # No upper bound here: with_context holds it to the context, which the region can store.
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens",
               f"must be at least 1, got {self.max_new_tokens}")  # fmt: skip
        t = self.temperature
        _check(math.isfinite(t) and t >= 0, "temperature", f"must be a finite number >= 0, got {t}")
        if 0 < t < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0 <= self.top_k < TOP_K_LIMIT, "top_k", f"must be 0 (off) or at least 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(math.isfinite(v) and -2 <= v <= 2, name, f"must be in [-2, 2], got {v}")
        r = self.repetition_penalty
        _check(math.isfinite(r) and 0 < r <= 100, "repetition_penalty", f"must be in (0, 100], got {r}")
        _check(self.seed is None or 0 <= self.seed < SEED_LIMIT, "seed",
               f"must be in [0, 2**64), got {self.seed}")  # fmt: skip
        _check(len(self.stop_ids) <= MAX_STOP_IDS, "stop_ids",
               f"at most {MAX_STOP_IDS} stop token ids, got {len(self.stop_ids)}")  # fmt: skip
        _check(all(0 <= i < 2**31 for i in self.stop_ids), "stop_ids", "stop token ids must be in [0, 2**31)")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")  # fmt: skip
        longest = max(map(len, self.stop), default=0)
        _check(longest <= MAX_STOP_STRING_CHARS, "stop",
               f"strings must be at most {MAX_STOP_STRING_CHARS} characters long, got {longest}")  # fmt: skip
        self._check_extras()

    def _check_extras(self) -> None:
        m = self.min_tokens
        _check(0 <= m < TOKEN_ID_LIMIT, "min_tokens", f"must be at least 0, got {m}")
        _check(self.max_new_tokens is None or m <= self.max_new_tokens, "min_tokens",
               f"must be at most max_new_tokens ({self.max_new_tokens}), got {m}")  # fmt: skip
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
               f"allows at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")  # fmt: skip
        for token, bias in self.logit_bias:
            _check(0 <= token < TOKEN_ID_LIMIT, "logit_bias", f"token ids must be in [0, 2**31), got {token}")
            _check(math.isfinite(bias) and abs(bias) <= LOGIT_BIAS_LIMIT, "logit_bias",
                   f"values must be in [-100, 100], got {bias} for token {token}")  # fmt: skip
        k = self.top_logprobs
        _check(0 <= k <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        _check(k == 0 or self.logprobs or self.prompt_logprobs, "top_logprobs",
               "needs logprobs (or prompt_logprobs) to be requested")  # fmt: skip

    @property
    def wants_logprobs(self) -> bool:
        """Some log-probability crosses the region for this request."""
        return self.logprobs or self.prompt_logprobs

    def first_logprob_position(self, prompt_len: int) -> int:
        """The first position whose token's log-probability is reported: the prompt's second
        token with prompt_logprobs (the first has no context), else the first output token."""
        return 1 if self.prompt_logprobs else prompt_len

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def with_context(self, prompt_len: int, max_model_len: int, what: str = "prompt") -> SamplingParams:
        """The record with `max_new_tokens` resolved for a prompt of `prompt_len` tokens.

        The one place that knows the context limit: InvalidParam(what) in vLLM's words when the
        prompt and the requested output do not fit `max_model_len`.
        """
        if prompt_len < 1:
            raise InvalidParam(what, f"The {what} is empty after tokenization.")
        if self.max_new_tokens is None:
            if prompt_len < max_model_len:
                return replace(self, max_new_tokens=max_model_len - prompt_len)
            raise InvalidParam(
                what,
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the input {what}.",
            )
        if prompt_len + self.max_new_tokens > max_model_len:
            raise InvalidParam(
                what,
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {prompt_len + self.max_new_tokens} tokens ({prompt_len} in the {what}, "
                f"{self.max_new_tokens} in the completion). Please reduce the length of the {what} "
                f"or completion.",
            )
        return self


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidParam(param, f"{param} {message}.")
