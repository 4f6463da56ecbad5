"""Graceful drain on SIGTERM/SIGINT, and exit codes that agree with the last log line.

A signal stops new requests (503 with an error object) and lets those in flight finish for up to
--shutdown-timeout seconds; the rest then end with an error (an error event and `data: [DONE]`
on an OpenAI stream, a 503 error object otherwise). The server exits 0 after a signal and 1 when
the engine died, and its last log line says so. `--model dummy --dummy-step-time` keeps requests
in flight as long as a test needs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from lightllm_async.ipc import Region
from serverproc import ServerProcess, wait_until

STEP = 0.01  # seconds per engine step: max_tokens N takes about N * STEP


class Client(threading.Thread):
    """One request in a thread; `result` is (status, SSE payloads or the JSON body)."""

    def __init__(self, srv: ServerProcess, path: str, body: dict, stream: bool = True):
        super().__init__(daemon=True)
        self.srv, self.path, self.body, self.is_stream = srv, path, body, stream
        self.result = None
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        if self.is_stream:
            self.result = (200, self.srv.stream(self.path, self.body, timeout=60))
        else:
            status, _, body = self.srv.request("POST", self.path, self.body, timeout=60)
            self.result = (status, body)
        self.ended_at = time.monotonic()


def last_line(srv: ServerProcess) -> str:
    return srv.text_log().rstrip("\n").rsplit("\n", 1)[-1]


def engine_pid(srv: ServerProcess) -> int:
    region = Region.attach(srv.region_name)
    try:
        return region.engine_pid
    finally:
        region.close()


def wait_generating(srv: ServerProcess, n: int) -> None:
    """Until n requests are in flight in the engine (by the metrics)."""

    def running() -> int:
        _, _, text = srv.request("GET", "/metrics")
        line = next(x for x in text.splitlines() if x.startswith("lightllm_async:num_requests_running "))
        return int(float(line.split()[1]))

    assert wait_until(lambda: running() >= n, 10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_requests_in_flight_finish_and_refuses_new_ones(sig):
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", str(STEP))
    streams = [
        Client(srv, "/v1/completions", {"prompt": "x", "max_tokens": 150, "stream": True}) for _ in range(2)
    ]
    plain = Client(srv, "/v1/completions", {"prompt": "x", "max_tokens": 150}, stream=False)
    wait_generating(srv, 3)
    srv.proc.send_signal(sig)
    time.sleep(0.3)  # the drain begins within a tick (0.1 s)
    status, headers, body = srv.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "shutting down" in body["error"]["message"], body
    status, _, body = srv.request("GET", "/health")
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    for c in [*streams, plain]:
        c.join(10)
    for c in streams:
        status, events = c.result
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert plain.result[0] == 200 and plain.result[1]["usage"]["completion_tokens"] == 150
    assert srv.proc.wait(10) == 0
    log = srv.text_log()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert last_line(srv).endswith("stopped (exit 0)"), log


def test_requests_still_running_at_the_shutdown_timeout_end_with_an_error():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", str(STEP), "--shutdown-timeout", "1")
    long = {"prompt": "x", "max_tokens": 3000}  # 30 s
    clients = [
        Client(srv, "/v1/completions", {**long, "stream": True}),
        Client(
            srv,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], **long, "stream": True},
        ),
        Client(srv, "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 3000}}),
        Client(srv, "/v1/completions", long, stream=False),
    ]
    wait_generating(srv, 4)
    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for c in clients:
        c.join(10)
        assert 0.9 < c.ended_at - signalled < 4, c.path
    for c in clients[:2]:  # OpenAI streams: an error event, then the end marker
        events = c.result[1]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"]
        assert len(events) > 20  # tokens flowed until the timeout
    native = clients[2].result[1]  # LightLLM's stream has no end marker: the error is last
    assert "shutting down" in json.loads(native[-1])["error"]["message"]
    status, body = clients[3].result
    assert status == 503 and "shutting down" in body["error"]["message"]
    assert srv.proc.wait(10) == 0
    log = srv.text_log()
    assert "Traceback" not in log and "shutdown timeout: ending 4 requests" in log, log
    assert last_line(srv).endswith("stopped (exit 0)"), log


def test_a_second_signal_ends_the_drain_at_once():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", str(STEP))  # timeout: 30 s
    c = Client(srv, "/v1/completions", {"prompt": "x", "max_tokens": 3000, "stream": True})
    wait_generating(srv, 1)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert c.is_alive()  # draining
    srv.proc.send_signal(signal.SIGINT)
    c.join(5)
    assert c.result[1][-1] == "[DONE]" and "error" in json.loads(c.result[1][-2])
    assert srv.proc.wait(10) == 0
    assert last_line(srv).endswith("stopped (exit 0)")


def test_an_idle_server_stops_at_once_on_a_signal():
    srv = ServerProcess("--model", "dummy")
    t = time.monotonic()
    assert srv.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t < 3
    assert last_line(srv).endswith("stopped (exit 0)")


def test_engine_death_exits_1_and_the_last_log_line_says_so():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", str(STEP))
    c = Client(srv, "/v1/completions", {"prompt": "x", "max_tokens": 3000, "stream": True})
    wait_generating(srv, 1)
    os.kill(engine_pid(srv), signal.SIGKILL)
    c.join(10)
    assert "error" in json.loads(c.result[1][-2])
    assert srv.proc.wait(10) == 1
    assert last_line(srv).endswith("stopped (exit 1)"), srv.text_log()
