"""What the frontend is given by the server process; built once, never edited."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .edge import EdgePolicy

if TYPE_CHECKING:
    from lightllm_async.ipc import FrontendRegion
    from lightllm_async.tokenizer import Tokenizer


@dataclass(frozen=True)
class FrontendContext:
    """The frontend's side of the shared region, the tokenizer, the served model's limits, and
    the edge policy (which Host names and Origins are answered; the default suits a loopback bind),
    and the API key every route but the open ones requires (None: no key).

    engine_alive (every engine runs) is called on the event loop by /health and for each request;
    replicas_alive (by replica, whether its engine runs; None: one replica, `engine_alive`) about
    ten times a second. Both must be cheap and must not block (Process.is_alive is fine).
    """

    region: FrontendRegion | None  # None: --role router (`remote` reads instead)
    tokenizer: Tokenizer
    served_model_name: str
    max_model_len: int
    engine_alive: Callable[[], bool]
    edge: EdgePolicy = EdgePolicy()
    replicas_alive: Callable[[], Sequence[bool]] | None = None
    pd_prefill: int = 0  # --pd: replicas [0, pd_prefill) prefill, the rest decode (reader.py); 0: off
    api_key: str | None = field(default=None, repr=False)  # never in a repr, so never in a log
    # --role: "prefill" | "decode" (this server's engine is rank `pd_rank` of `pd_world` in the PD
    # group; it serves the internal endpoints, frontend/pd_internal.py) or "router"; "" otherwise
    pd_role: str = ""
    pd_rank: int = -1
    pd_world: int = 0
    pd_secret: str | None = field(default=None, repr=False)  # required by the internal endpoints
    remote: Any = None  # --role router: its RemoteReader (frontend/router.py)
    max_choices: int = 256  # without a region: the most choices (`n`) a request may ask for
