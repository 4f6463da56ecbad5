"""Random JSON at every endpoint of one real server: every answer is 2xx, or 4xx with an OpenAI
error object; never a 5xx, a hang or a dropped connection; and the server still serves after.

Each field of each request Struct gets values of its own type (with edge values: 0, -1, 2**63,
denormals, 1e-5, empty and long strings, huge stop lists) or any JSON value (nulls, booleans,
huge ints, floats, unicode, nested lists and dicts, JSON nested thousands deep, NaN literals),
with and without `stream`; whole bodies are also replaced by random bytes. One server on the
dummy model serves the whole module; if an input kills it, the next example starts a new one, so
hypothesis shrinks to the input that did it and not to whatever came after.

    LLA_PROPERTY_EXAMPLES=5000   examples per endpoint (default 200) for a long local run
    LLA_PROPERTY_MODEL=default   the embedded SmolLM2 on the CPU (real sampling) instead of dummy
"""

from __future__ import annotations

import http.client
import json
import os
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverproc import ServerProcess, wait_until

EXAMPLES = int(os.environ.get("LLA_PROPERTY_EXAMPLES", "200"))
MODEL = os.environ.get("LLA_PROPERTY_MODEL", "dummy")
NUM_SLOTS = 16
MAX_MODEL_LEN = 256
TIMEOUT_S = 30.0 if MODEL == "dummy" else 300.0  # one answer; longer is a hang

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ---------------------------------------------------------------- the server


class LiveServer:
    """One server for the module; `ensure()` replaces it when an input killed it."""

    def __init__(self):
        model = [] if MODEL == "default" else ["--model", MODEL]
        self.args = [*model, "--num-slots", str(NUM_SLOTS), "--max-model-len", str(MAX_MODEL_LEN)]
        self.deaths: list[str] = []  # the tail of each dead server's log
        self.srv = ServerProcess(*self.args)

    def ensure(self) -> ServerProcess:
        if self.srv.proc.poll() is not None:
            self.deaths.append(self.srv.text_log()[-3000:])
            self.srv = ServerProcess(*self.args)
        return self.srv

    def close(self) -> None:
        if self.srv.proc.poll() is None:
            assert self.srv.stop() == 0, self.srv.text_log()[-3000:]


@pytest.fixture(scope="module")
def server():
    live = LiveServer()
    yield live
    live.close()


# ---------------------------------------------------------------- values


class Raw:
    """JSON text spliced in as is: nesting deeper than json.dumps recurses, NaN literals."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'…' if len(self.text) > 40 else ''} len={len(self.text)})"


def encode(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{json.dumps(k)}:{encode(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


def _deep(depth: int, kind: str, leaf) -> Raw:
    inner = json.dumps(leaf)
    if kind == "list":
        return Raw("[" * depth + inner + "]" * depth)
    return Raw('{"a":' * depth + inner + "}" * depth)


EDGE_INTS = [0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53 + 1]
EDGE_INTS += [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**40, -(10**40)]
INTS = st.one_of(st.integers(-1000, 1000), st.integers(), st.sampled_from(EDGE_INTS))
EDGE_FLOATS = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e-45, 1.4e-45, 9.99e-6, 1e-5]
EDGE_FLOATS += [1.0000001e-5, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, 100.0, 3.4e38, 3.5e38, 1e308, -1.0]
FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(EDGE_FLOATS))
UNIT_FLOATS = st.one_of(st.floats(0, 1), st.sampled_from(EDGE_FLOATS))
SPECIAL_TEXT = ["", " ", "\x00", "\ud800", "\udfff", "🎉", "\u202e", "<|im_end|>", "<|endoftext|>"]
SPECIAL_TEXT += ["<|im_start|>system\n", "{{ raise_exception('x') }}", "{% for %}", "\\", '"', "\n\n"]
SHORT_TEXT = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(SPECIAL_TEXT))
LONG_TEXT = st.builds(lambda s, n: s * n, st.sampled_from(["a", "é", "🎉", "ab ", "\u0301", "<|im_end|>"]),
                      st.integers(1000, 60_000))  # fmt: skip
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, LONG_TEXT)
BAD_LITERALS = st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999")])
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, SHORT_TEXT)
NESTED = st.recursive(
    SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(SHORT_TEXT, kids, max_size=4)),
    max_leaves=12,
)
# Nesting of any depth has its own test below, so that its failure does not hide the others'.
DEEP = st.builds(_deep, st.integers(1, 200), st.sampled_from(["list", "dict"]), SCALARS)
ANY = st.one_of(SCALARS, NESTED, DEEP, BAD_LITERALS, LONG_TEXT)


def shaped(required: dict, optional: dict, wrong_one_in: int = 20) -> st.SearchStrategy[dict]:
    """An object with these fields: each optional one present or not, each present one of its type
    (edge values included), except one in `wrong_one_in`, which is any JSON value instead, or for a
    required field left out. Shrinking leads to fewer fields and fewer wrong ones."""

    @st.composite
    def build(draw) -> dict:
        out = {}
        for name, right in {**required, **optional}.items():
            if name in optional and not draw(st.booleans()):
                continue
            if not draw(st.sampled_from([False] * (wrong_one_in - 1) + [True])):
                out[name] = draw(right)
            elif name in optional or draw(st.booleans()):
                out[name] = draw(ANY)
        return out

    return build()


STOP = st.one_of(
    st.none(),
    SHORT_TEXT,
    st.lists(SHORT_TEXT, max_size=8),
    LONG_TEXT,
    st.builds(lambda s, n: [s] * n, SHORT_TEXT, st.integers(100, 20_000)),  # huge stop lists
    st.builds(lambda n: [str(i) for i in range(n)], st.integers(100, 20_000)),
)
MAX_TOKENS = st.one_of(st.integers(1, 40), st.integers(1, 40), INTS)
TEMPERATURE = st.one_of(st.floats(0, 2), st.sampled_from(EDGE_FLOATS), FLOATS)
TOP_P = st.one_of(st.floats(0, 1), st.sampled_from(EDGE_FLOATS))
TOP_K = st.one_of(st.integers(-1, 100), INTS)
SEED = st.one_of(st.integers(0, 1000), INTS)
ONE = st.one_of(st.just(1), st.just(1), INTS)  # n, best_of
PENALTY = st.one_of(st.floats(-3, 3), st.floats(0, 200), st.sampled_from(EDGE_FLOATS), FLOATS)
LOGIT_BIAS = st.dictionaries(
    st.one_of(st.integers(-5, 60_000).map(str), SHORT_TEXT),
    st.one_of(st.floats(-120, 120), st.sampled_from(EDGE_FLOATS), FLOATS),
    max_size=8,
)
OPENAI_SAMPLING = {
    "model": st.one_of(st.none(), SHORT_TEXT),
    "max_tokens": MAX_TOKENS,
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "top_k": TOP_K,
    "stop": STOP,
    "seed": SEED,
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), shaped({}, {"include_usage": st.booleans()})),
    "n": ONE,
    "min_p": TOP_P,
    "presence_penalty": PENALTY,
    "frequency_penalty": PENALTY,
    "repetition_penalty": PENALTY,
    "min_tokens": MAX_TOKENS,
    "stop_token_ids": st.lists(st.one_of(st.integers(0, 60_000), INTS), max_size=20),
    "logit_bias": LOGIT_BIAS,
}
UNKNOWN = st.dictionaries(
    st.sampled_from(["logprobs", "user", "tools", "x", "presence_penalty"]), ANY, max_size=2
)

CONTENT_PART = shaped({"type": st.sampled_from(["text", "text", "image_url", ""])}, {"text": TEXT})
MESSAGE = shaped(
    {"role": st.sampled_from(["user", "user", "assistant", "system", "tool", "developer", "🎉"])},
    {"content": st.one_of(TEXT, st.lists(CONTENT_PART, max_size=3), st.none())},
)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 49_151), INTS), max_size=300)
PROMPT = st.one_of(
    SHORT_TEXT, TOKEN_IDS, LONG_TEXT, st.lists(TOKEN_IDS, max_size=2), st.lists(TEXT, max_size=2)
)
GENERATE_PARAMETERS = shaped(
    {},
    {
        "max_new_tokens": MAX_TOKENS,
        "do_sample": st.booleans(),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "top_k": TOP_K,
        "stop_sequences": STOP,
        "stop": STOP,
        "ignore_eos": st.booleans(),
        "seed": SEED,
        "n": ONE,
        "best_of": ONE,
        "min_new_tokens": MAX_TOKENS,
        "repetition_penalty": PENALTY,
        "presence_penalty": PENALTY,
        "frequency_penalty": PENALTY,
    },
)


def _body(required: dict, optional: dict) -> st.SearchStrategy:
    """A request object with unknown fields added; one in ten is any JSON value instead."""
    typed = st.builds(lambda extra, b: {**extra, **b}, UNKNOWN, shaped(required, optional))
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda wrong: ANY if wrong else typed)


NATIVE = _body({"inputs": TEXT}, {"parameters": st.one_of(st.none(), GENERATE_PARAMETERS)})
BODIES = {
    "/v1/chat/completions": _body(
        {"messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=4), st.just([]))},
        {
            **OPENAI_SAMPLING,
            "max_completion_tokens": MAX_TOKENS,
            "logprobs": st.booleans(),
            "top_logprobs": st.one_of(st.integers(-1, 22), INTS),
        },
    ),
    "/v1/completions": _body(
        {"prompt": PROMPT},
        {**OPENAI_SAMPLING, "logprobs": st.one_of(st.integers(-1, 7), INTS), "echo": st.booleans()},
    ),
    "/generate": NATIVE,
    "/generate_stream": NATIVE,
    "/tokenize": _body(
        {},
        {
            "prompt": TEXT,
            "messages": st.lists(MESSAGE, max_size=4),
            "add_special_tokens": st.booleans(),
            "add_generation_prompt": st.booleans(),
            "return_token_strs": st.booleans(),
        },
    ),
    "/detokenize": _body({"tokens": TOKEN_IDS}, {}),
}
GENERATING = {"/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream"}


# ---------------------------------------------------------------- one exchange and its checks


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(srv: ServerProcess, method: str, path: str, body: bytes | None) -> Answer:
    """One request on a fresh connection; a timeout or a dropped connection fails the example."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT_S)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    except TimeoutError as e:
        raise AssertionError(f"no answer within {TIMEOUT_S}s (a hang): {e!r}") from e
    except (ConnectionError, http.client.HTTPException) as e:
        raise AssertionError(f"connection dropped instead of an answer: {e!r}") from e
    finally:
        conn.close()


def assert_error_object(obj, status: int) -> None:
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] == status, err


def sse_payloads(body: bytes) -> list[bytes]:
    text = body.decode()
    assert text.endswith("\n\n"), f"stream cut without an end: {text[-200:]!r}"
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data:") for e in events), events[:3]
    return [e[5:].strip().encode() for e in events]


FINISHED = ("stop", "length")  # a 200 that ends otherwise (abort, null) lost its request


def check_stream(path: str, body: bytes) -> None:
    """Every event is JSON; the stream ends with [DONE] (OpenAI), a finished event (native), or an
    error event, and an error event is a client error, never the server's."""
    payloads = sse_payloads(body)
    native = path == "/generate_stream"
    if not native:
        assert payloads[-1] == b"[DONE]", payloads[-3:]
        payloads = payloads[:-1]
    events = [json.loads(p) for p in payloads]
    assert events, "a stream without a single event"
    for ev in events:
        if "error" in ev:
            assert_error_object(ev, ev["error"].get("code"))
            assert ev["error"]["code"] < 500, f"server error inside a 200 stream: {ev}"
    last = events[-1]
    if native and "error" not in last:
        assert last["finished"] and last["finish_reason"] in FINISHED, last
    if not native:
        kinds = {"chat.completion.chunk", "text_completion"}
        assert all(ev.get("object") in kinds for ev in events if "error" not in ev), events[:2]


def check_answer(path: str, ans: Answer) -> None:
    assert ans.status < 500, f"{ans.status} {ans.body[:500]!r}"
    assert 200 <= ans.status < 300 or 400 <= ans.status < 500, ans.status
    if ans.status >= 400:
        assert ans.headers.get("content-type") == "application/json", ans.headers
        assert_error_object(json.loads(ans.body), ans.status)
    elif ans.headers.get("content-type") == "text/event-stream":
        check_stream(path, ans.body)
    elif path == "/metrics":
        assert b"lightllm_async:request_slots_free" in ans.body
    else:
        out = json.loads(ans.body)
        if path == "/tokenize":
            assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN, out
        elif path == "/detokenize":
            assert isinstance(out["prompt"], str), out
        elif path in GENERATING:
            reason = out["finish_reason"] if "finish_reason" in out else out["choices"][0]["finish_reason"]
            assert reason in FINISHED, out


def post(live: LiveServer, path: str, body: bytes) -> None:
    srv = live.ensure()
    ans = exchange(srv, "POST", path, body)
    check_answer(path, ans)


def metric(srv: ServerProcess, name: str) -> float:
    _, _, text = srv.request("GET", "/metrics", timeout=10)
    return float(re.search(rf"^lightllm_async:{name} (\S+)$", text, re.M).group(1))


def assert_still_serves(live: LiveServer) -> None:
    """After the storm: /health 200, a normal request 200, and every slot and KV token back."""
    srv = live.ensure()
    assert not live.deaths, "a server died during the run:\n" + "\n----\n".join(live.deaths)
    assert srv.request("GET", "/health", timeout=10)[0] == 200
    status, _, out = srv.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}, timeout=30)
    assert status == 200 and out["usage"]["completion_tokens"] == 4, out

    def idle() -> bool:
        slots_back = metric(srv, "request_slots_free") == NUM_SLOTS
        return slots_back and metric(srv, "kv_cache_tokens_free") == metric(srv, "kv_cache_tokens_total")

    assert wait_until(idle, 10), srv.request("GET", "/metrics")[2]


# ---------------------------------------------------------------- the properties


@pytest.mark.parametrize("path", list(BODIES))
def test_random_json_fields_get_2xx_or_a_4xx_error_object(server, path):
    @SETTINGS
    @given(body=BODIES[path])
    def prop(body):
        post(server, path, encode(body).encode("utf-8", "surrogatepass"))

    prop()
    assert_still_serves(server)


DEEP_ANY = st.builds(_deep, st.integers(1, 5000), st.sampled_from(["list", "dict"]), SCALARS)


@pytest.mark.parametrize("path", list(BODIES))
def test_json_nested_thousands_deep_gets_a_400(server, path):
    """As a whole body, as an unknown field, or as any field's value."""

    @settings(SETTINGS, max_examples=max(EXAMPLES // 2, 20))
    @given(body=BODIES[path], where=st.integers(0, 20), deep=DEEP_ANY)
    def prop(body, where, deep):
        if isinstance(body, dict) and where:
            keys = [*body, "unknown_field"]
            body[keys[where % len(keys)]] = deep
        else:
            body = deep
        post(server, path, encode(body).encode("utf-8", "surrogatepass"))

    prop()
    assert_still_serves(server)


RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"}", b"[]", b"null", b'{"prompt": "x",}', b'{"a":1}{"b":2}', b"\xff\xfe{}"]),
    st.builds(
        lambda b, n: b[:n], st.just(b'{"prompt": "hi", "max_tokens": 3, "stream": true}'), st.integers(0, 48)
    ),  # fmt: skip
)


@pytest.mark.parametrize("path", list(BODIES))
def test_malformed_bodies_get_a_400_error_object(server, path):
    @SETTINGS
    @given(body=RAW_BODIES)
    def prop(body):
        post(server, path, body)

    prop()
    assert_still_serves(server)


ROUTES = [*BODIES, "/v1/models", "/health", "/metrics", "/openapi.json"]


@settings(SETTINGS, max_examples=max(EXAMPLES // 2, 20))
@given(
    method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.one_of(st.sampled_from(ROUTES), st.sampled_from(ROUTES).map(lambda p: p + "/"), st.just("/nope")),
    query=st.one_of(st.just(""), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)),
    body=st.one_of(st.none(), st.binary(max_size=100)),
)
def test_every_route_and_method_gets_2xx_or_a_4xx_error_object(server, method, path, query, body):
    srv = server.ensure()
    target = path + ("?" + query.replace("#", "%23") if query else "")
    ans = exchange(srv, method, target, body)
    check_answer(path, ans)


def test_the_server_still_serves_after_everything(server):
    assert_still_serves(server)
