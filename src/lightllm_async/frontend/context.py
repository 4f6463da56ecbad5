"""What the frontend is given by the server process; built once, never edited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightllm_async.ipc import FrontendRegion
    from lightllm_async.tokenizer import Tokenizer


@dataclass(frozen=True)
class FrontendContext:
    """The frontend's side of the shared region, the tokenizer and the served model's limits.

    engine_alive is called on the event loop about ten times a second and by /health; it must be
    cheap and must not block (Process.is_alive is fine).
    """

    region: FrontendRegion
    tokenizer: Tokenizer
    served_model_name: str
    max_model_len: int
    engine_alive: Callable[[], bool]
