"""The soak's requests: what each one is, drawn from a seeded generator so a run can be replayed.

Kinds: `normal` (chat, completions, native; streaming or not), `stop` (a stop string that matches
early: the frontend aborts the engine request), `disconnect` (the client leaves mid-body, right
after the request, or mid-stream, with a FIN or a RST), `abort` (a non-streaming client gives up
after a random wait, as a client-side timeout does), `hostile` (malformed JSON, wrong types,
out-of-range values, JSON nested thousands deep: a 4xx is the right answer), `edge` (legal
extremes: 64-bit seeds, temperatures at the greedy cut, tiny top_p, a huge stop list) and `burst`
(more requests at once than the server has slots: 503 + Retry-After is the right answer for some).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from soak_http import Leave

WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "blue", "sky", "why", "42", "é", "🎉", "über", "naïve")
CHAT, COMPLETIONS, GENERATE, GENERATE_STREAM = (
    "/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream",
)  # fmt: skip
ENDPOINTS = (CHAT, COMPLETIONS, GENERATE, GENERATE_STREAM)
WEIGHTS = {"normal": 0.45, "stop": 0.05, "disconnect": 0.22, "abort": 0.08, "hostile": 0.12, "edge": 0.08}


@dataclass(frozen=True)
class Spec:
    """One request to send and how to judge its answer."""

    kind: str
    path: str
    body: bytes
    stream: bool
    leave: Leave | None = None
    exact_tokens: int | None = None  # completion tokens a complete answer must report
    note: str = ""  # which hostile or edge case this is


class Mix:
    """Draws Specs. `max_tokens` bounds normal outputs; `burst_tokens` keeps burst streams (and
    the SIGTERM ones) in flight long enough to hold their slots."""

    def __init__(self, seed: int, max_tokens: int, burst_tokens: int, huge_stops: int):
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.burst_tokens = burst_tokens
        self.huge_stops = huge_stops

    def draw(self) -> Spec:
        kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        return getattr(self, kind)()

    # ------------------------------------------------------------ well-formed requests

    def _prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 24)))

    def _request(self, path: str, stream: bool, max_tokens: int, **extra) -> tuple[dict, int | None]:
        """A valid body and the completion tokens it must produce (when ignore_eos pins them)."""
        r = self.rng
        ignore_eos = r.random() < 0.8
        sampling = {"temperature": r.choice([0.0, 0.7, 1.0]), "seed": r.choice([None, r.randrange(2**32)])}
        if path in (GENERATE, GENERATE_STREAM):
            params = {"max_new_tokens": max_tokens, "ignore_eos": ignore_eos, "do_sample": True, **sampling}
            body = {"inputs": self._prompt(), "parameters": {**params, **extra}}
        else:
            body = {"max_tokens": max_tokens, "ignore_eos": ignore_eos, "stream": stream, **sampling, **extra}
            if stream and r.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
            if path == CHAT:
                body["messages"] = [{"role": "user", "content": self._prompt()}]
            else:
                body["prompt"] = (
                    self._prompt() if r.random() < 0.7 else [r.randrange(3, 999) for _ in range(8)]
                )
        exact = max_tokens if ignore_eos and "stop" not in extra else None
        return body, exact

    def normal(self, kind: str = "normal", stream: bool | None = None, max_tokens: int | None = None) -> Spec:
        path = self.rng.choice(ENDPOINTS)
        if path in (GENERATE, GENERATE_STREAM):
            stream = path == GENERATE_STREAM
        elif stream is None:
            stream = self.rng.random() < 0.5
        n = max_tokens or self.rng.randint(1, self.max_tokens)
        body, exact = self._request(path, stream, n)
        return Spec(kind, path, json.dumps(body).encode(), stream, exact_tokens=exact)

    def stop(self) -> Spec:
        path = self.rng.choice(ENDPOINTS)
        stream = path == GENERATE_STREAM or (path != GENERATE and self.rng.random() < 0.5)
        stops = self.rng.sample(["e", "a", "o", " ", "t", "1", ".", "the"], 3)
        body, _ = self._request(path, stream, self.max_tokens, stop=stops)
        return Spec("stop", path, json.dumps(body).encode(), stream)

    def burst(self, n: int) -> list[Spec]:
        return [self.normal("burst", stream=True, max_tokens=self.burst_tokens) for _ in range(n)]

    # ------------------------------------------------------------ clients that go away

    def disconnect(self) -> Spec:
        r = self.rng
        spec = self.normal("disconnect", stream=r.random() < 0.7, max_tokens=self.burst_tokens)
        where = r.choice(["body", "sent", "stream", "stream"] if spec.stream else ["body", "sent"])
        leave = Leave(
            where,
            cut=r.randrange(len(spec.body)),
            wait=r.choice([0.0, r.uniform(0, 0.05)]),
            events=r.randint(1, 8),
            rst=r.random() < 0.5,
        )
        return Spec("disconnect", spec.path, spec.body, spec.stream, leave, note=f"at {where}")

    def abort(self) -> Spec:
        spec = self.normal("abort", stream=False, max_tokens=self.burst_tokens)
        leave = Leave("sent", wait=self.rng.uniform(0.005, 0.3), rst=self.rng.random() < 0.3)
        return Spec("abort", spec.path, spec.body, False, leave, note="client timeout")

    # ------------------------------------------------------------ hostile and edge

    def hostile(self) -> Spec:
        r = self.rng
        note, path, raw = r.choice(HOSTILE)
        body = raw(r) if callable(raw) else raw
        return Spec("hostile", path, body if isinstance(body, bytes) else body.encode(), False, note=note)

    def edge(self) -> Spec:
        r = self.rng
        path = r.choice((CHAT, COMPLETIONS, GENERATE))
        note, extra = r.choice(EDGE)
        if note == "huge stop list":
            extra = {"stop": [f"{r.randrange(10**12):x}zq" for _ in range(self.huge_stops)]}
        body, exact = self._request(path, False, r.randint(1, self.max_tokens), **extra)
        return Spec("edge", path, json.dumps(body).encode(), False, exact_tokens=exact, note=note)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


_MSG = '"messages": [{"role": "user", "content": "x"}]'
HOSTILE = [
    ("empty body", COMPLETIONS, b""),
    ("truncated JSON", CHAT, b'{"messages": [{"role": "user", "content": "hi"'),
    ("trailing comma", COMPLETIONS, b'{"prompt": "hi", "max_tokens": 3,}'),
    ("not UTF-8", GENERATE, b'{"inputs": "\xff\xfe"}'),
    ("random bytes", GENERATE_STREAM, lambda r: r.randbytes(r.randint(1, 300))),
    ("NaN temperature", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}'),
    ("top-level array", CHAT, b'[{"role": "user", "content": "hi"}]'),
    ("prompt is a number", COMPLETIONS, b'{"prompt": 5}'),
    ("messages is a string", CHAT, b'{"messages": "hi"}'),
    ("inputs is a list", GENERATE, b'{"inputs": ["hi"]}'),
    ("max_tokens is a string", COMPLETIONS, b'{"prompt": "hi", "max_tokens": "10"}'),
    ("stream is a string", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}'),
    ("parameters is a list", GENERATE_STREAM, b'{"inputs": "hi", "parameters": []}'),
    ("stop is a number list", COMPLETIONS, b'{"prompt": "hi", "stop": [1, 2]}'),
    ("max_tokens 0", COMPLETIONS, b'{"prompt": "hi", "max_tokens": 0}'),
    (
        "max_tokens 10**12",
        CHAT,
        f'{{{_MSG}, "max_tokens": 1000000000000}}',
    ),
    ("seed 2**64", COMPLETIONS, b'{"prompt": "hi", "seed": 18446744073709551616}'),
    ("seed -2**63-1", GENERATE, b'{"inputs": "hi", "parameters": {"seed": -9223372036854775809}}'),
    (
        "seed 10**30",
        CHAT,
        f'{{{_MSG}, "seed": {10**30}}}',
    ),
    ("temperature -1", COMPLETIONS, b'{"prompt": "hi", "temperature": -1}'),
    ("temperature 1e309", COMPLETIONS, b'{"prompt": "hi", "temperature": 1e309}'),
    ("top_p 0", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}'),
    ("top_k -5", GENERATE, b'{"inputs": "hi", "parameters": {"top_k": -5, "do_sample": true}}'),
    ("n 2", COMPLETIONS, b'{"prompt": "hi", "n": 2}'),
    ("token id out of range", COMPLETIONS, b'{"prompt": [1, 2, 99999999]}'),
    ("image content part", CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'),
    ("prompt too long", COMPLETIONS, lambda r: json.dumps({"prompt": list(range(3, 999)) * 20})),
    ("deep JSON body 2000", COMPLETIONS, lambda r: '{"prompt": "x", "a": ' + _deep(2000) + "}"),
    ("deep JSON prompt 5000", COMPLETIONS, lambda r: '{"prompt": ' + _deep(5000) + "}"),
    ("deep JSON messages 3000", CHAT, lambda r: '{"messages": [{"role": "user", "x": ' + _deep(3000) + "}]}"),
]

EDGE = [
    ("seed 2**64-1", {"seed": 2**64 - 1}),
    ("seed -2**63", {"seed": -(2**63)}),
    ("seed 2**63", {"seed": 2**63}),
    ("temperature 1e-5 (greedy cut)", {"temperature": 1e-5}),
    ("temperature just above 1e-5", {"temperature": 1.0000001e-5}),
    ("temperature denormal", {"temperature": 5e-324}),
    ("temperature 100", {"temperature": 100.0}),
    ("temperature 3.5e38 (past float32)", {"temperature": 3.5e38}),
    ("top_p denormal", {"top_p": 5e-324, "temperature": 1.0}),
    ("top_p 1e-45", {"top_p": 1e-45, "temperature": 1.0}),
    ("top_k 1", {"top_k": 1, "temperature": 1.0}),
    ("top_k 2**31-1", {"top_k": 2**31 - 1, "temperature": 1.0}),
    ("top_k 2**40", {"top_k": 2**40, "temperature": 1.0}),
    ("huge stop list", {}),
]
