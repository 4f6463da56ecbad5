"""Judging one answer of the soak: completed, refused (503 + Retry-After), client error (4xx with an
OpenAI error object), disconnected (the client left on purpose), or lost, with the reason.

Lost is everything a client could not act on: no answer, a 5xx, a 4xx or 503 without an error
object, a body cut before its end, a stream that ends without [DONE] / a finished event / an error
event, an error event inside a 200 stream, or a 200 whose content contradicts the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from soak_http import Reply, sse_payloads
from soak_mix import GENERATE, GENERATE_STREAM, Spec

COMPLETED, REFUSED, CLIENT_ERROR, DISCONNECTED, LOST = (
    "completed", "refused", "client_error", "disconnected", "lost",
)  # fmt: skip
FINISHED = ("stop", "length")


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str = ""  # for lost answers: what was wrong
    status: int = 0


def judge(spec: Spec, reply: Reply) -> Verdict:
    if reply.left:
        return Verdict(DISCONNECTED, status=reply.status)
    if reply.wire_error:
        where = f"after {reply.status}" if reply.status else "before a response"
        return Verdict(LOST, f"broken {where}: {reply.wire_error}", reply.status)
    if not reply.whole:
        return Verdict(LOST, "body cut before its end", reply.status)
    try:
        return _judge_status(spec, reply)
    except (ValueError, KeyError, IndexError, TypeError, AssertionError) as e:
        return Verdict(
            LOST, f"{reply.status} with a bad body ({type(e).__name__}: {e}): {reply.body[:200]!r}"
        )


def _judge_status(spec: Spec, reply: Reply) -> Verdict:
    s = reply.status
    if s == 503 and reply.headers.get("retry-after") and _error_code(reply.body) == 503:
        return Verdict(REFUSED, status=s)
    if 400 <= s < 500 and _error_code(reply.body) == s:
        return Verdict(CLIENT_ERROR, status=s)
    if s != 200:
        return Verdict(LOST, f"{s}: {reply.body[:200]!r}", s)
    if reply.headers.get("content-type") == "text/event-stream":
        return _judge_stream(spec, reply)
    out = json.loads(reply.body)
    if spec.path == GENERATE:
        reason, tokens = out["finish_reason"], out["count_output_tokens"]
    else:
        reason, tokens = out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]
    return _judge_finish(spec, reason, tokens)


def _judge_stream(spec: Spec, reply: Reply) -> Verdict:
    payloads = sse_payloads(reply.body)
    native = spec.path == GENERATE_STREAM
    if not native:
        if not payloads or payloads[-1] != b"[DONE]":
            return Verdict(LOST, f"stream ended without [DONE]: {reply.body[-200:]!r}", 200)
        payloads = payloads[:-1]
    events = [json.loads(p) for p in payloads]
    if errors := [e for e in events if "error" in e]:
        return Verdict(LOST, f"error event in a 200 stream: {errors[0]}", 200)
    if native:
        last = events[-1]
        assert last["finished"], "the last native event is not finished"
        return _judge_finish(spec, last["finish_reason"], last["token"]["count_output_tokens"])
    reasons = [c["choices"][0]["finish_reason"] for c in events if c["choices"]]
    usage = [c["usage"] for c in events if c.get("usage")]
    return _judge_finish(spec, reasons[-1], usage[-1]["completion_tokens"] if usage else None)


def _judge_finish(spec: Spec, reason: str | None, tokens: int | None) -> Verdict:
    if reason not in FINISHED:
        return Verdict(LOST, f"200 that finished with {reason!r}", 200)
    if spec.exact_tokens is not None and tokens is not None and tokens != spec.exact_tokens:
        return Verdict(LOST, f"200 with {tokens} completion tokens, asked {spec.exact_tokens}", 200)
    return Verdict(COMPLETED, status=200)


def _error_code(body: bytes) -> int | None:
    """The `code` of an OpenAI error object, or None when the body is not one."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err):
        return None
    return err["code"]


def sigterm_end(spec: Spec, reply: Reply) -> str:
    """How an in-flight request ended across a SIGTERM: "complete"; "error" (an OpenAI error object,
    or an error event and then the stream's end); "cut" (no answer, or a body without its end);
    "bad" (an answer that is neither, such as a plain-text 500)."""
    if reply.wire_error or not reply.whole:
        return "cut"
    v = judge(spec, reply)
    if v.outcome == COMPLETED:
        return "complete"
    if v.outcome in (REFUSED, CLIENT_ERROR) or _error_code(reply.body) is not None:
        return "error"
    if reply.headers.get("content-type") == "text/event-stream":
        payloads = sse_payloads(reply.body)
        ended = spec.path == GENERATE_STREAM or (payloads and payloads[-1] == b"[DONE]")
        if ended and any(p.startswith(b'{"error"') for p in payloads):
            return "error"
    return "bad"
