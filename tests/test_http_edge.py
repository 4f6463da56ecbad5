"""Issue 8, the HTTP edge: browser safety by default, and bounds on slow and greedy clients.

In-process (the ASGI app of test_frontend_app's harness): POST bodies must be JSON (415), a
server bound to loopback answers only loopback Host names (421, DNS rebinding), CORS headers only
for --allowed-origins. Through a real server and raw sockets: a client that stalls gets 408 and
is dropped, a head over the limits gets 431, connections beyond --max-connections get 503, and
what uvicorn refuses is an error object too.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from asgi_client import JSON, call
from lightllm_async.frontend.edge import EdgePolicy
from lightllm_async.frontend.limits import MAX_HEADER_BYTES, MAX_HEADERS
from serverproc import ServerProcess
from test_frontend_app import Harness


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- browser safety


@pytest.mark.parametrize(
    "ctype,status",
    [
        (None, 415),
        (b"text/plain", 415),
        (b"text/plain;charset=UTF-8", 415),
        (b"application/x-www-form-urlencoded", 415),
        (b"multipart/form-data; boundary=x", 415),
        (b"application/json; charset=latin-1", 415),
        (b"application/json", 200),
        (b"application/json; charset=utf-8", 200),
        (b"Application/JSON;Charset=UTF-8", 200),
    ],
)
def test_post_bodies_must_be_json(tokenizer, ctype, status):
    async def go():
        async with Harness(tokenizer) as h:
            headers = () if ctype is None else ((b"content-type", ctype),)
            r = await call(h.app, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', headers)
            assert r.status == status, r.body
            if status == 415:
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error" and "application/json" in err["message"]
                assert h.engine.submitted == []

    run(go())


LOOPBACK_HOSTS = [b"localhost", b"LOCALHOST:8000", b"localhost.", b"127.0.0.1", b"127.3.2.1:9", b"[::1]:8000"]
OTHER_HOSTS = [b"evil.example", b"evil.example:8000", b"localhost.evil.example", b"10.0.0.1", b"[::2]"]


def test_loopback_server_refuses_other_host_names(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:  # the default policy: bound to loopback
            for host in LOOPBACK_HOSTS:
                r = await call(h.app, "GET", "/health", headers=((b"host", host),))
                assert r.status == 200, host
            for host in OTHER_HOSTS:
                r = await call(h.app, "GET", "/v1/models", headers=((b"host", host),))
                assert r.status == 421 and "--allowed-hosts" in r.json()["error"]["message"], host
                r = await call(h.app, "POST", "/v1/completions", b'{"prompt": "x"}', (JSON, (b"host", host)))
                assert r.status == 421
            assert h.engine.submitted == []

    run(go())


def test_allowed_hosts_widen_the_host_check_and_a_public_bind_has_none():
    def allows(policy: EdgePolicy, host: str) -> bool:
        from lightllm_async.frontend.edge import Edge
        from lightllm_async.frontend.protocol import ApiError

        try:
            Edge(policy).check({"headers": [(b"host", host.encode())]})
            return True
        except ApiError:
            return False

    widened = EdgePolicy.for_bind("127.0.0.1", ["api.example", "Other.Example."], [])
    assert all(allows(widened, h) for h in ["api.example:80", "other.example", "localhost:1"])
    assert not allows(widened, "evil.example")
    assert allows(EdgePolicy.for_bind("127.0.0.1", ["*"], []), "evil.example")
    assert allows(EdgePolicy.for_bind("0.0.0.0", [], []), "evil.example")
    assert allows(EdgePolicy.for_bind("::", [], []), "evil.example")
    public_named = EdgePolicy.for_bind("0.0.0.0", ["api.example"], [])
    assert allows(public_named, "api.example") and not allows(public_named, "evil.example")
    assert not allows(EdgePolicy.for_bind("localhost", [], []), "evil.example")
    assert not allows(EdgePolicy.for_bind("::1", [], []), "evil.example")


def test_no_cors_headers_unless_origins_are_allowed(tokenizer):
    origin = (b"origin", b"http://page.example")
    preflight = (origin, (b"access-control-request-method", b"POST"))

    async def go():
        async with Harness(tokenizer) as h:
            r = await call(
                h.app, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', (JSON, origin)
            )
            assert r.status == 200 and not any(k.startswith("access-control") for k in r.headers)
            r = await call(h.app, "OPTIONS", "/v1/completions", headers=preflight)
            assert r.status == 405 and not any(k.startswith("access-control") for k in r.headers)

            h.app.edge.policy = EdgePolicy.for_bind("127.0.0.1", [], ["http://page.example/"])
            r = await call(
                h.app,
                "OPTIONS",
                "/v1/chat/completions",
                headers=(*preflight, (b"access-control-request-headers", b"content-type, authorization")),
            )
            assert r.status == 204, r.body
            assert r.headers["access-control-allow-origin"] == "http://page.example"
            assert "POST" in r.headers["access-control-allow-methods"]
            assert r.headers["access-control-allow-headers"] == "content-type, authorization"
            r = await call(
                h.app, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', (JSON, origin)
            )
            assert r.status == 200 and r.headers["access-control-allow-origin"] == "http://page.example"
            r = await call(
                h.app,
                "POST",
                "/v1/completions",
                b'{"prompt": "x", "max_tokens": 1, "stream": true}',
                (JSON, origin),
            )
            assert r.headers["access-control-allow-origin"] == "http://page.example"
            other = (b"origin", b"http://evil.example")
            r = await call(h.app, "OPTIONS", "/v1/completions", headers=(other, preflight[1]))
            assert r.status == 403 and "access-control-allow-origin" not in r.headers
            r = await call(h.app, "GET", "/v1/models", headers=(other,))
            assert r.status == 200 and "access-control-allow-origin" not in r.headers

            h.app.edge.policy = EdgePolicy.for_bind("127.0.0.1", [], ["*"])
            r = await call(h.app, "GET", "/v1/models", headers=(other,))
            assert r.headers["access-control-allow-origin"] == "*"

    run(go())


# ---------------------------------------------------------------- through a real server, raw sockets


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def _head(path: str = "/health", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}".encode()


def test_allowed_hosts_and_origins_flags():
    srv = ServerProcess(
        "--model", "dummy", "--allowed-hosts", "api.example", "--allowed-origins", "http://ui.example"
    )
    try:
        for host, status in [("api.example:8000", 200), ("localhost", 200), ("evil.example", 421)]:
            s = _connect(srv)
            head = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nOrigin: http://ui.example\r\n"
            s.sendall(head.encode() + b"Connection: close\r\n\r\n")
            raw = _read_all(s)
            assert int(raw.split(b" ", 2)[1]) == status, raw
            assert (b"access-control-allow-origin: http://ui.example" in raw) == (status == 200)
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------- slow and greedy clients


@pytest.fixture(scope="module")
def edge_server():
    srv = ServerProcess(
        "--model", "dummy", "--dummy-step-time", "0.01", "--read-timeout", "0.5", "--max-connections", "6"
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0


@pytest.mark.parametrize(
    "sent,what",
    [
        (b"", "headers"),  # connects and says nothing
        (_head() + b"X-Slow: 1", "headers"),  # half a head
        (
            _head("/v1/completions", "POST", "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            + b'{"prompt": ',
            "body",
        ),  # half a body
    ],  # fmt: skip
    ids=["silent", "half-head", "half-body"],
)
def test_a_client_that_stalls_gets_408_and_is_dropped(edge_server, sent, what):
    s = _connect(edge_server)
    s.sendall(sent)
    t = time.monotonic()
    raw = _read_all(s)
    assert 0.3 < time.monotonic() - t < 3
    status, err = _status_and_error(raw)
    assert status == 408 and what in err["message"]
    assert edge_server.request("GET", "/health")[0] == 200


def test_a_slow_but_complete_request_and_a_long_stream_are_not_cut(edge_server):
    s = _connect(edge_server)
    body = json.dumps({"prompt": "x", "max_tokens": 100, "stream": True}).encode()  # ~1 s of tokens
    head = _head(
        "/v1/completions", "POST", f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    for piece in (head, b"\r\n", body[:10], body[10:]):
        s.sendall(piece)
        time.sleep(0.1)  # each piece within the timeout, the whole within it too
    s.settimeout(10)
    data = b""
    while not data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
        chunk = s.recv(65536)
        assert chunk, data[-200:]
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"data: {") >= 50
    s.close()


@pytest.mark.parametrize(
    "head",
    [
        _head(extra="".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS + 1)) + "\r\n"),
        _head(extra="X-Big: " + "a" * (MAX_HEADER_BYTES + 1) + "\r\n\r\n"),
        _head(extra="X-Big: " + "a" * (MAX_HEADER_BYTES * 8)),  # still coming: refused at the bound
        b"GET /" + b"a" * (MAX_HEADER_BYTES + 1) + b" HTTP/1.1\r\n\r\n",
    ],
    ids=["many-headers", "large-header", "endless-header", "long-url"],
)
def test_a_head_over_the_limits_gets_431(edge_server, head):
    s = _connect(edge_server)
    s.sendall(head)
    status, err = _status_and_error(_read_all(s))
    assert status == 431 and err["type"] == "invalid_request_error"


def test_a_malformed_request_gets_an_error_object(edge_server):
    s = _connect(edge_server)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, err = _status_and_error(_read_all(s))
    assert status == 400 and err["message"]


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(edge_server):
    streams = []
    for _ in range(6):  # the cap: six streams held open
        s = _connect(edge_server)
        body = json.dumps({"prompt": "x", "max_tokens": 300, "stream": True}).encode()
        s.sendall(
            _head(
                "/v1/completions",
                "POST",
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n",
            )
            + body
        )
        assert s.recv(12) == b"HTTP/1.1 200"
        streams.append(s)
    s = _connect(edge_server)
    s.sendall(_head() + b"\r\n")
    status, err = _status_and_error(_read_all(s))
    assert status == 503 and "--max-connections" in err["message"]
    for s in streams:
        s.close()
    deadline = time.monotonic() + 5
    while edge_server.request("GET", "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_foreign_host_name_is_refused_over_http(edge_server):
    s = _connect(edge_server)
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: rebind.example:8000\r\nConnection: close\r\n\r\n")
    status, err = _status_and_error(_read_all(s))
    assert status == 421 and err["type"] == "invalid_request_error"
