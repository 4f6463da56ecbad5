"""Start `lightllm-async` as a real process tree for end-to-end tests, and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lightllm_async.server ...` in its own process group, with its log captured."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lightllm_async.server", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(ready_timeout):
            self.kill_tree()
            raise RuntimeError("server did not become ready:\n" + self.text_log())

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if "lightllm-async ready" in line:
                self._ready.set()
        self._ready.set()  # exited: let the waiter look at the log

    def text_log(self) -> str:
        return "".join(self.log)

    @property
    def region_name(self) -> str:
        return f"lla-{self.proc.pid}"

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout=120):
        """(status, headers, parsed JSON or text) for one plain HTTP request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), _parse(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), _parse(e.read())

    def stream(self, path: str, body, timeout=120) -> list[str]:
        """The `data:` payloads of an SSE response, in order."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                line = line.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    events.append(line[5:].strip())
        return events

    def stop(self, sig=signal.SIGTERM, timeout=30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def wait_until(pred, timeout=10.0, interval=0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
