"""What the router and the role servers say to each other (`--role`; notes/CONTRACTS.md,
"Prefill/decode disaggregation", "Across servers"). Token ids, not text: the router tokenizes,
detokenizes and formats the API's responses itself, as a one-host frontend does, so the role
servers' internal endpoints carry only what the region would.

    router -> prefill server   POST /internal/pd/prefill  PrefillCall -> a stream of Events
    prefill -> decode server   POST /internal/pd/decode   DecodeCall (the handoff, before its event)
    router -> decode server    POST /internal/pd/attach   AbortCall (by id) -> a stream of Events
    router -> prefill server   POST /internal/pd/abort    AbortCall (the client of call `id` left)
    router -> either           GET  /internal/pd/info     -> RoleInfo (200 while its engine runs)

A stream is `json\\n\\n` events: `tokens` and `logprobs` as they come, then one last event that
is a `finish`, a `handoff` (the prefill engine handed the request to the decode engine the call
named, and the prefill server gave it to the decode server, where it waits for the router to
attach by the call's id), or an `error`. A stream that ends without one means the server died.
"""

from __future__ import annotations

import msgspec

from lightllm_async.types import SamplingParams

INFO_PATH = "/internal/pd/info"
PREFILL_PATH = "/internal/pd/prefill"
ABORT_PATH = "/internal/pd/abort"
ATTACH_PATH = "/internal/pd/attach"
DECODE_PATH = "/internal/pd/decode"
SECRET_HEADER = "x-lla-pd-secret"


class PrefillCall(msgspec.Struct, forbid_unknown_fields=True):
    """Run the prompt; hand the request to group rank `decode_rank`, whose server (at
    `decode_url`) this server then gives the request to, under the call's `id`."""

    prompt_ids: list[int]
    params: SamplingParams
    decode_rank: int
    decode_url: str
    id: str  # for an AbortCall


class AbortCall(msgspec.Struct, forbid_unknown_fields=True):
    """Names a call by its id: to abort (prefill server) or to attach to (decode server)."""

    id: str


class DecodeCall(msgspec.Struct, forbid_unknown_fields=True):
    """Take over the request prefill engine `source` handed off as its transfer `seq`, until the
    router attaches by `id`; `abort`: only to receive its KV (the transfers of a pair go in order)
    and drop it."""

    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int]
    source: int
    seq: int
    cached_tokens: int
    id: str
    abort: bool = False


class Handoff(msgspec.Struct, array_like=True):
    source: int
    seq: int
    cached_tokens: int
    output_ids: list[int]


class Logprobs(msgspec.Struct, array_like=True):
    start: int
    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class Event(msgspec.Struct, omit_defaults=True):
    tokens: list[int] = []
    logprobs: Logprobs | None = None
    finish: int = -1  # a FinishReason
    cached_tokens: int = 0
    queue_time: float | None = None
    handoff: Handoff | None = None
    error: str | None = None


class RoleInfo(msgspec.Struct):
    role: str
    rank: int
    world: int
    alive: bool
    max_model_len: int  # the router refuses a server whose context is not its own
    num_slots: int  # the router keeps at most this many of its requests on the server


EVENT_DECODER = msgspec.json.Decoder(Event)
