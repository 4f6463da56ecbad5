"""Every bound the HTTP edge puts on what one client may send, in one place (README lists them).

A request beyond a bound is answered with an OpenAI error object that names the bound, before the
server spends work on it: no bound here depends on the model except the prompt size, which
`Service` derives from the context length and the tokenizer.
"""

from __future__ import annotations

from lightllm_async.types import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS  # checked by SamplingParams

__all__ = [
    "KEEP_ALIVE_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "MAX_CHOICES",
    "MAX_CONTENT_PARTS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGES",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
]

# Bodies. A prompt that fits the context is far smaller: 4096 tokens of text are some 20 KiB.
MAX_BODY_BYTES = 8 * 1024 * 1024  # 413 beyond; checked against Content-Length before reading
MAX_MESSAGES = 4096  # messages in one chat request
MAX_CONTENT_PARTS = 256  # content parts in one chat message
MAX_CHOICES = 128  # `n`: each choice is a request of its own (a slot; fewer slots bound it lower)
# JSON nesting is bounded by msgspec's decoder at the interpreter's recursion limit (about 1000
# levels); a deeper body is a 400, as is any other body that does not decode.

# Request heads (the request line and the headers), enforced by frontend/http_server.py: 431 beyond.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024

# An idle keep-alive connection is closed after this long (uvicorn's timeout_keep_alive).
KEEP_ALIVE_TIMEOUT_S = 5
