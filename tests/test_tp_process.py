"""The process tree under tensor parallelism (`--tp N`): rank 0 and its followers start, follow
every step, stop together, and the death of any rank ends the server like a single engine's.

`--model dummy` keeps these fast: the followers run the dummy runner behind the same step channel
(tests/test_tp_model.py runs a real model at TP=2 over gloo).
"""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

from serverproc import ServerProcess, kill_mid_stream, wait_until
from test_lifecycle import alive, children_of, engine_pid, region_files


def engine_ranks(srv: ServerProcess) -> tuple[int, list[int]]:
    """(rank 0's pid, the followers' pids): the server's spawned children other than rank 0."""
    rank0 = engine_pid(srv)
    spawned = []
    for pid in children_of(srv.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    spawned.append(pid)
        except OSError:
            pass
    return rank0, sorted(p for p in spawned if p != rank0)


def completion(srv: ServerProcess, prompt: str, n: int) -> str:
    status, _, body = srv.request(
        "POST", "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0}
    )
    assert status == 200, body
    return body["choices"][0]["text"]


def test_tp3_serves_as_tp1_and_every_rank_follows_then_stops_cleanly():
    one = ServerProcess("--model", "dummy")
    try:
        want = [completion(one, f"prompt {i}", 5 + i) for i in range(6)]
    finally:
        assert one.stop() == 0
    srv = ServerProcess("--model", "dummy", "--tp", "3", "--log-level", "debug")
    rank0, followers = engine_ranks(srv)
    assert len(followers) == 2 and all(alive(p) for p in [rank0, *followers])
    got: list = [None] * 6

    def one_request(i: int) -> None:
        got[i] = completion(srv, f"prompt {i}", 5 + i)

    threads = [threading.Thread(target=one_request, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == want
    assert srv.stop(signal.SIGTERM) == 0
    assert wait_until(lambda: not any(alive(p) for p in [rank0, *followers]), 5)
    assert region_files(srv) == []
    steps = [int(n) for n in re.findall(r"rank \d stops after (\d+) steps", srv.text_log())]
    assert len(steps) == 2 and min(steps) > 0  # both followers ran rank 0's steps, then left


@pytest.mark.parametrize("victim", ["follower", "rank0"])
def test_a_rank_killed_mid_stream_errors_requests_within_2s_and_the_server_exits_1(victim):
    srv = ServerProcess("--model", "dummy", "--tp", "2", "--dummy-step-time", "0.02")
    rank0, followers = engine_ranks(srv)
    seconds, results = kill_mid_stream(srv, followers[0] if victim == "follower" else rank0)
    assert seconds < 2.5
    assert len(results) == 3
    for events in results:
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert srv.proc.wait(10) == 1
    assert wait_until(lambda: not any(alive(p) for p in [rank0, *followers]), 10)
    assert region_files(srv) == []
