"""perf/soak.py in its bounded mode (--ci: 300 requests on the dummy model, SIGTERM at the end):
nothing lost, no slot or KV token leaked, a clean stop, and the mix really exercised every path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_ci_loses_nothing_leaks_nothing_and_stops_cleanly(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    soak = os.path.join(ROOT, "perf", "soak.py")
    cmd = [sys.executable, soak, "--ci", "--requests", "300", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    table = proc.stdout[-4000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    o = r["outcomes"]
    # the run did what it claims: answers of every kind, refusals under bursts, streams cut by SIGTERM
    assert o.get("completed", 0) > 100 and o.get("client_error", 0) > 0, table
    assert o.get("disconnected", 0) > 30 and r["answers_503"] > 0, table
    assert r["sigterm"]["in_flight_at_sigterm"] > 0, table
    assert (r["lost"], r["leaked_slots"], r["leaked_kv_tokens"]) == (0, 0, 0), table
    assert proc.returncode == 0, table
