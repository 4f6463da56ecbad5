"""Process-tree lifecycle: clean stops, stale regions after kill -9, 0600 segments, engine death.

These use `--model dummy` (no weights): the process tree and the shared memory are the same as
with a real model, and the tests stay fast.
"""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest

from lightllm_async.ipc import Region
from serverproc import ServerProcess, kill_mid_stream, wait_until


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def engine_pid(srv: ServerProcess) -> int:
    region = Region.attach(srv.region_name)
    try:
        return region.engine_pid
    finally:
        region.close()


def region_files(srv: ServerProcess) -> list[str]:
    name = srv.region_name
    return [f for f in os.listdir("/dev/shm") if f == name or f.startswith(f"sem.{name}-")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_every_process_and_removes_shared_memory(sig):
    srv = ServerProcess("--model", "dummy")
    engines = children_of(srv.proc.pid)
    assert engine_pid(srv) in engines and all(alive(p) for p in engines)
    files = region_files(srv)
    assert len(files) == 3  # the region and two semaphores
    mode = stat.S_IMODE(os.stat(f"/dev/shm/{srv.region_name}").st_mode)
    assert mode == 0o600
    assert srv.stop(sig) == 0
    assert wait_until(lambda: not any(alive(p) for p in engines), 5)
    assert region_files(srv) == []


def test_after_kill_9_of_the_tree_the_next_start_cleans_the_stale_region():
    srv = ServerProcess("--model", "dummy")
    srv.kill_tree()
    assert len(region_files(srv)) == 3  # nothing could clean up
    nxt = ServerProcess("--model", "dummy")
    try:
        assert region_files(srv) == []
        assert nxt.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})[0] == 200
    finally:
        assert nxt.stop() == 0


def test_engine_killed_mid_stream_errors_requests_and_server_exits_nonzero():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", "0.02")
    seconds, results = kill_mid_stream(srv, engine_pid(srv))
    assert seconds < 3
    for events in results:
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert srv.proc.wait(10) != 0
    assert region_files(srv) == []


def test_engine_failure_inside_forward_is_reported_and_server_exits_nonzero():
    srv = ServerProcess("--model", "dummy", "--fail-after-steps", "3")
    status, _, body = srv.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 50})
    assert status == 503 and "error" in body
    assert srv.proc.wait(10) != 0
    assert "injected device failure" in srv.text_log()
    assert region_files(srv) == []


def test_a_taken_port_stops_the_server_at_once_with_a_clear_error_and_no_engine():
    """The port is bound before anything loads: a second server on it fails in seconds, not after
    loading a model (and no socket the engines open meanwhile can take the port from it)."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "lightllm_async.server", "--model", "dummy", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stdout + out.stderr
    assert "engine" not in (out.stdout + out.stderr).replace("no engine", "")
    assert time.monotonic() - start < 30


def test_sigint_while_loading_stops_a_server_started_with_sigint_ignored():
    """A script's `lightllm-async &` starts the server with SIGINT ignored (a shell without job
    control does that to background jobs). Its `kill -INT` while the model loads must stop the
    server as it does once serving, not be lost (2026-11-30: a device script's was, and the server
    came up and served on until a timeout killed it)."""
    import subprocess
    import sys

    from serverproc import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightllm_async.server", "--port", str(port), "--device", "cpu", "--no-cache"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        start_new_session=True,
    )
    try:
        log = []
        for line in proc.stdout:  # the engine's first line: it is loading the default model now
            log.append(line)
            if "engine INFO" in line:
                break
        assert not any("ready" in line for line in log)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        log.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(log)
    assert proc.returncode == 0, text
    assert "lightllm-async ready" not in text and "stopped (exit 0)" in text
    assert not [
        f for f in os.listdir("/dev/shm") if f == f"lla-{proc.pid}" or f.startswith(f"sem.lla-{proc.pid}-")
    ]
