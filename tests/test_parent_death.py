"""The engine dies with its parent: after a `kill -9` of the server's main process (and of it
alone), the kernel ends the engine (PR_SET_PDEATHSIG), so nothing keeps holding the device, and
the next start removes the shared memory the killed server left.

The engine is kept busy (a long request in flight): an idle engine also notices a dead parent
by itself, but a busy one, or one loading weights, would not look until its work is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import pytest

from serverproc import ServerProcess, wait_until
from test_lifecycle import alive, engine_pid, region_files

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def test_kill_9_of_the_main_process_ends_a_busy_engine_and_the_next_start_cleans_up():
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", "0.01")
    engine = engine_pid(srv)
    body = {"prompt": "x", "max_tokens": 3000, "stream": True}  # 30 s of work
    threading.Thread(target=lambda: _swallow(srv.stream, "/v1/completions", body), daemon=True).start()
    running = "lightllm_async:num_requests_running 1.0"
    assert wait_until(lambda: running in srv.request("GET", "/metrics")[2], 10)
    os.kill(srv.proc.pid, signal.SIGKILL)  # the main process only, not its group
    srv.proc.wait(5)
    assert wait_until(lambda: not alive(engine), 2, interval=0.02), "the engine outlived its parent"
    assert len(region_files(srv)) == 3  # nothing could clean up
    nxt = ServerProcess("--model", "dummy")
    try:
        assert region_files(srv) == []
        assert nxt.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})[0] == 200
    finally:
        assert nxt.stop() == 0
        srv.kill_tree()  # anything else the killed server left in its group


def _swallow(fn, *args) -> None:
    with contextlib.suppress(OSError):  # the server goes away under the stream
        fn(*args)
