"""Overload against a real server: a request beyond the slots is refused at once with 503 and
Retry-After (never queued without bound), the server keeps serving, and --max-running-requests
queues in the engine below the slot count instead of refusing.

The dummy model with a step time keeps requests in flight for as long as a test needs them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from lightllm_async.ipc import Region
from serverproc import ServerProcess, wait_until


class Stream:
    """A streaming completion held open by a thread until `close()` (the client then goes away)."""

    def __init__(self, srv: ServerProcess, max_tokens: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {"prompt": "x", "max_tokens": max_tokens, "stream": True}
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.events = 0
        self.status: int | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            resp = self.conn.getresponse()
            self.status = resp.status
            for line in resp:
                self.events += line.startswith(b"data:")
        except Exception:  # noqa: BLE001 - closed under us on purpose
            pass

    def close(self) -> None:
        self.conn.sock.shutdown(2)  # the client goes away mid-stream
        self.conn.close()
        self._thread.join(5)


def _complete(srv: ServerProcess, stream: bool = False):
    body = {"prompt": "x", "max_tokens": 3, "stream": stream}
    t = time.monotonic()
    status, headers, resp = srv.request("POST", "/v1/completions", body, timeout=30)
    return status, {k.lower(): v for k, v in headers.items()}, resp, time.monotonic() - t


def test_request_beyond_the_slots_gets_503_with_retry_after_and_the_server_recovers():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", "0.02", "--num-slots", "2")
    try:
        streams = [Stream(srv, 3000) for _ in range(2)]
        assert wait_until(lambda: all(s.events > 0 for s in streams), 10)  # both slots in use
        for stream in (False, True):
            status, headers, body, took = _complete(srv, stream)
            assert status == 503 and headers.get("retry-after") == "1", (status, headers, body)
            assert body["error"]["code"] == 503 or "capacity" in body["error"]["message"]
            assert took < 2.0  # refused at once, not queued
        assert srv.request("GET", "/health")[0] == 200  # full is not dead
        assert all(s.status == 200 for s in streams)
        for s in streams:
            s.close()  # the server aborts them and frees their slots
        assert wait_until(lambda: _complete(srv)[0] == 200, 10)
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()


def test_max_running_requests_queues_in_the_engine_below_the_slot_count():
    srv = ServerProcess(
        "--model", "dummy", "--dummy-step-time", "0.02", "--num-slots", "3", "--max-running-requests", "1"
    )  # fmt: skip
    region = Region.attach(srv.region_name)
    try:
        streams = [Stream(srv, 3000) for _ in range(3)]
        stats = region.engine_stats
        assert wait_until(lambda: (stats().num_running, stats().num_waiting) == (1, 2), 10), stats()
        assert _complete(srv)[0] == 503  # three slots: the fourth request is refused
        for s in streams:
            s.close()
        assert wait_until(lambda: stats().num_running + stats().num_waiting == 0, 10), stats()
        status, _, body, _ = _complete(srv)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert srv.stop() == 0
    finally:
        region.close()
        if srv.proc.poll() is None:
            srv.kill_tree()
