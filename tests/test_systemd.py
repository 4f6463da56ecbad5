"""Issue 11, systemd: sd_notify over $NOTIFY_SOCKET (READY=1, WATCHDOG=1, STOPPING=1), a watchdog
that stops pinging when the engine's heartbeat stops, the unit `lightllm-async systemd-unit`
prints, and --api-key / LLA_API_KEY through the real command.

The socket a test binds stands in for systemd's. A wedged engine is an engine process stopped with
SIGSTOP (alive to the server, its heartbeat frozen), or, in-process, the real engine held inside a
step by the scripted runner's gate.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from engine_harness import LiveEngine
from lightllm_async import systemd
from lightllm_async.ipc import Region, RegionSpec
from lightllm_async.server import build_parser, main, resolve_config
from lightllm_async.types import SamplingParams
from serverproc import ServerProcess


class FakeSystemd:
    """A datagram socket bound where $NOTIFY_SOCKET points, collecting (time, message) in a thread."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"lla-notify-{os.getpid()}-{time.monotonic_ns()}"
        self.path = None if abstract else f"/tmp/{name}.sock"  # short: a socket path has 107 bytes
        self.address = "@" + name if abstract else self.path
        self.sock.bind("\0" + name if abstract else self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def firsts(self, since: float = 0.0) -> list[str]:
        """The first line of each message since `since` (READY=1, WATCHDOG=1, STOPPING=1)."""
        return [m.split("\n", 1)[0] for t, m in list(self.messages) if t >= since]

    def wait_for(self, first_line: str, timeout: float, since: float = 0.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if t >= since and m.split("\n", 1)[0] == first_line:
                    return t
            time.sleep(0.02)
        raise AssertionError(f"no {first_line} within {timeout} s: {self.firsts(since)}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if self.path is not None:
            os.unlink(self.path)


# ---------------------------------------------------------------- sd_notify


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(abstract):
    fake = FakeSystemd(abstract)
    try:
        assert systemd.notify("READY=1\nSTATUS=hi", {"NOTIFY_SOCKET": fake.address})
        fake.wait_for("READY=1", 2)
        assert fake.messages[0][1] == "READY=1\nSTATUS=hi"
    finally:
        fake.close()


def test_notify_without_systemd_does_nothing_and_never_raises(tmp_path):
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only():
    me = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": me}) == 1.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pings_every_interval_while_the_heartbeat_moves_and_never_when_it_stops():
    now, beat, sent = [0.0], [0], []
    dog = systemd.Watchdog(2.0, lambda: beat[0], stale_after=3.0, send=sent.append, clock=lambda: now[0])

    def run(seconds: float, beating: bool) -> list[float]:
        """Tick every 1/8 s (exact in binary), beating every other tick if `beating`; the pings' times."""
        pings = []
        for i in range(int(seconds * 8)):
            now[0] += 0.125
            if beating and i % 2:
                beat[0] += 1
            if dog.tick():
                pings.append(now[0])
        return pings

    pings = run(10, beating=True)
    assert pings == [0.125, 2.125, 4.125, 6.125, 8.125] and sent == ["WATCHDOG=1"] * 5
    wedged_at = now[0]
    pings = run(10, beating=False)  # a wedge: only a ping due before it is noticed may come
    assert all(t <= wedged_at + 3.0 for t in pings) and len(pings) <= 2 and dog.stalled
    pings = run(3, beating=True)
    assert pings and pings[0] <= now[0] - 2.5 and not dog.stalled  # resumes at once


def test_a_real_engine_beats_while_idle_and_stops_beating_when_wedged_in_a_step():
    region = Region.create(f"sd-test-{os.getpid()}", RegionSpec(num_slots=4, max_tokens_per_slot=64))
    engine = LiveEngine(region.name, [5, 6, 7], 64)
    sent: list[float] = []
    dog = systemd.Watchdog(0.1, lambda: region.heartbeat, stale_after=1.0, send=lambda _: sent.append(1))

    def pings_during(seconds: float) -> int:
        before = len(sent)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            dog.tick()
            time.sleep(0.02)
        return len(sent) - before

    try:
        assert pings_during(1.5) >= 10  # idle: no steps, yet the heartbeat moves
        engine.pause()  # the next step blocks inside the runner, as a hung device would
        assert region.start_request([1, 2, 3], SamplingParams(max_new_tokens=4).with_context(3, 64))
        pings_during(0.3)  # the wake-up from its idle wait beats once more, then it is stuck
        beat = region.heartbeat
        pings_during(0.5)
        assert region.heartbeat == beat, "a wedged engine does not beat"
        pings_during(0.5)  # the last pings, before the wedge is 1 s old
        assert pings_during(1.5) == 0 and dog.stalled
        engine.resume()
        assert pings_during(0.5) >= 3 and not dog.stalled
    finally:
        engine.kill()
        region.close()
        region.unlink()


# ---------------------------------------------------------------- the real command


def engine_pid(srv: ServerProcess) -> int:
    region = Region.attach(srv.region_name)
    try:
        return region.engine_pid
    finally:
        region.close()


def test_ready_watchdog_and_stopping_in_order_and_a_wedged_engine_stops_the_pings():
    fake = FakeSystemd()
    env = {"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    srv = ServerProcess("--model", "dummy", "--dummy-step-time", "0.01", env=env)
    engine = engine_pid(srv)
    try:
        fake.wait_for("READY=1", 5)
        assert fake.firsts()[0] == "READY=1"  # nothing before it: no ping before serving
        t = fake.wait_for("WATCHDOG=1", 3)
        fake.wait_for("WATCHDOG=1", 3, since=t + 0.01)

        os.kill(engine, signal.SIGSTOP)  # wedged: alive, but its heartbeat no longer moves
        stopped = time.monotonic()
        time.sleep(2.0)  # the stale limit (1 s) and a ping interval
        quiet_from = time.monotonic()
        time.sleep(2.0)
        assert "WATCHDOG=1" not in fake.firsts(since=quiet_from), fake.firsts(since=stopped)
        assert "no more watchdog pings" in srv.text_log()

        os.kill(engine, signal.SIGCONT)
        fake.wait_for("WATCHDOG=1", 3, since=time.monotonic())

        result: list = []
        stream = threading.Thread(
            target=lambda: result.append(
                srv.stream("/v1/completions", {"prompt": "x", "max_tokens": 100, "stream": True})
            )
        )
        stream.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        fake.wait_for("STOPPING=1", 2, since=signalled)
        stream.join(10)
        assert result[0][-1] == "[DONE]"  # the drain let it finish
        assert json.loads(result[0][-2])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(10) == 0
        firsts = fake.firsts()
        assert firsts.count("READY=1") == 1 and firsts.count("STOPPING=1") == 1
        assert firsts[0] == "READY=1" and 0 < firsts.index("WATCHDOG=1") < firsts.index("STOPPING=1")
    finally:
        if srv.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
            srv.kill_tree()
        fake.close()


def test_api_key_from_the_environment_guards_the_real_server_and_never_reaches_the_log():
    key = "sk-env-" + os.urandom(8).hex()
    srv = ServerProcess("--model", "dummy", "--log-level", "debug", env={"LLA_API_KEY": key})
    try:
        status, headers, body = srv.request("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert srv.request("GET", "/health")[0] == 200 and srv.request("GET", "/metrics")[0] == 200
        req = urllib.request.Request(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        assert srv.stop() == 0
        assert key not in srv.text_log()
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()


def test_api_key_flag_and_environment_resolve_into_a_config_that_never_shows_it(monkeypatch):
    monkeypatch.delenv("LLA_API_KEY", raising=False)
    assert resolve_config(build_parser().parse_args(["--model", "dummy"])).api_key is None
    cfg = resolve_config(build_parser().parse_args(["--model", "dummy", "--api-key", "flag-key"]))
    assert cfg.api_key == "flag-key" and "flag-key" not in repr(cfg)
    monkeypatch.setenv("LLA_API_KEY", "env-key")
    assert resolve_config(build_parser().parse_args(["--model", "dummy"])).api_key == "env-key"
    cfg = resolve_config(build_parser().parse_args(["--model", "dummy", "--api-key", "flag-key"]))
    assert cfg.api_key == "flag-key"  # the flag wins


# ---------------------------------------------------------------- systemd-unit


def unit_of(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#",))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(text)
    return unit


def test_systemd_unit_prints_a_notify_unit_serving_with_the_given_flags(capsys):
    flags = [
        "--model",
        "dummy",
        "--port",
        "9001",
        "--served-model-name",
        "50%$off",
        "--shutdown-timeout",
        "20",
    ]
    assert main(["systemd-unit", *flags, "--api-key", "s3cret", "--watchdog-sec", "40"]) == 0
    out = capsys.readouterr()
    text = out.out
    assert "s3cret" not in text + out.err and "LLA_API_KEY" in out.err
    svc = unit_of(text)["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure" and svc["KillMode"] == "mixed"
    assert svc["WatchdogSec"] == "40" and svc["TimeoutStopSec"] == "35"  # the drain + 15 s
    exec_start = svc["ExecStart"]
    # systemd would expand % and $: they are doubled, so the flag means itself
    assert exec_start == f"{sys.executable} -m lightllm_async.server " + (
        "--model dummy --port 9001 --served-model-name '50%%$$off' --shutdown-timeout 20"
    )
    assert svc["EnvironmentFile"].startswith("-/")
    assert unit_of(text)["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_refuses_flags_the_server_would_refuse():
    cmd = [sys.executable, "-m", "lightllm_async.server", "systemd-unit"]
    for bad in (["--no-such-flag"], ["--api", "k"], ["--port", "eighty"]):
        r = subprocess.run([*cmd, *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage: lightllm-async systemd-unit" in r.stderr, (bad, r.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ExecStart=" in r.stdout and "Type=notify" in r.stdout
