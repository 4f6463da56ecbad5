"""Token ids → text deltas while streaming, and stop strings matched on that text.

`IncrementalDetokenizer` follows vLLM's prefix/read offsets: each step decodes a short window that
ends at the newest token and emits only what the window added beyond its already-emitted prefix.
Decoding a window rather than single tokens keeps SentencePiece's leading spaces and byte-level
BPE pieces right, and a window that ends in U+FFFD (an incomplete UTF-8 character) is held back
until the next token completes it.

`StopMatcher` cuts the text at the first stop string and holds back any tail that could still
become one, so a client never sees the beginning of a stop string that later matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first output token (vLLM uses 5)


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns output token ids into text deltas whose concatenation is the decoded output."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._decode = tokenizer.decode
        self._skip = skip_special_tokens
        # The window always starts at a token boundary already emitted; ids before it are dropped.
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._read = len(self._ids)  # ids[:read] have been emitted (or are prompt context)
        self._prefix_text = self._text(self._ids)

    def _text(self, ids: Sequence[int]) -> str:
        return self._decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the text they complete (maybe "", held back for the next ones)."""
        self._ids.extend(token_ids)
        if len(self._ids) == self._read:
            return ""
        text = self._text(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """At the end of the output: whatever is still held back, incomplete characters too."""
        if len(self._ids) == self._read:
            return ""
        text = self._text(self._ids)
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # Next window starts at the old read offset: the tokens just emitted become the context.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._text(self._ids)
        return delta


class StopMatcher:
    """Feeds text through; stops at the first stop string, which is not part of the output."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the part of `held + text` that is safe to show; sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The text held back as a possible stop-string start, once no more text will come."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
