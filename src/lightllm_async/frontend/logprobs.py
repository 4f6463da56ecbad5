"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` entries, and the legacy
completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset).

A token is shown as its own text, decoded alone with special tokens spelled out (so a byte-level
piece of a multi-byte character shows as U+FFFD, as in vLLM); `bytes` are that text's UTF-8.
-inf, which JSON cannot carry, is written as -9999.0 (vLLM's floor).
"""

from __future__ import annotations

from collections.abc import Sequence

from .generation import TokenLogprob
from .protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob

LOGPROB_FLOOR = -9999.0


class TokenTexts:
    """Each token id's own text, cached (a vocabulary's worth at most)."""

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode([token_id], skip_special_tokens=False)
        return text


def _lp(x: float) -> float:
    return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf and NaN (False both ways) too


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenTexts) -> ChatLogprobs:
    """`choices[].logprobs` of chat: one entry per token, each with its top tokens."""
    content = []
    for e in entries:
        token = text(e.token_id)
        top = [TopLogprob(text(t), _lp(v), list(text(t).encode())) for t, v in e.top]
        content.append(TokenLogprobEntry(token, _lp(e.logprob), list(token.encode()), top))
    return ChatLogprobs(content)


class CompletionLogprobsWriter:
    """The legacy lists for a choice's tokens, one call per response or stream chunk; each
    token's text_offset continues from the tokens written before it."""

    def __init__(self, text: TokenTexts):
        self._text = text
        self.offset = 0

    def write(self, entries: Sequence[TokenLogprob | tuple[int, None]]) -> CompletionLogprobs:
        """An entry (token_id, None) has no log-probability: the prompt's first token."""
        out = CompletionLogprobs([], [], [], [])
        for e in entries:
            if isinstance(e, TokenLogprob):
                token, logprob = self._text(e.token_id), _lp(e.logprob)
                top: dict[str, float] | None = {}
                for t, v in e.top:  # best first: where two tokens read the same, the better one
                    top.setdefault(self._text(t), _lp(v))
                top.setdefault(token, logprob)  # the token itself is always there (OpenAI's "+1")
            else:
                token, logprob, top = self._text(e[0]), None, None
            out.text_offset.append(self.offset)
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(top)
            self.offset += len(token)
        return out
