"""Soak: a real server under a long mixed load, then a SIGTERM with streams in flight.

    python perf/soak.py                              # embedded SmolLM2 on the CPU, 10,000 requests
    python perf/soak.py --requests 2000 --out perf/out/soak_cpu.json
    python perf/soak.py --ci --out /tmp/soak.json    # 300 requests on --model dummy, < 2 min

It starts the server itself, then sends N requests through `--concurrency` clients (one
connection per request): normal chat / completions / native requests, streaming and not; about
30% of clients that go away (mid-body, right after the request, mid-stream, or a client-side
timeout; FIN or RST); malformed and hostile bodies; legal extremes; and every `--burst-every`
requests a burst of `--burst` simultaneous streams, more than the slots (a 503 with Retry-After
is retried up to `--retries` times after the time it asks; one still refused counts as refused).
See soak_mix.py for the exact mix and soak_check.py for how an answer is judged.

Then, once the server is idle, /metrics must show every slot and KV token free again. Last,
`--sigterm-streams` long requests are started, and the server gets SIGTERM once each has its
first event: every one of them must end complete or with an error (an error object, or an error
event and then the end of the stream), never cut silently; the server must exit 0, its engine
with it, and remove its shared memory.

Measured: requests sent / completed / refused / client errors / disconnected / lost (must be 0),
leaked slots and KV tokens (must be 0), the RSS of the server and engine processes every second
(start, after warm-up, end, growth after warm-up), p50/p99 latency of normal requests, and the
worst /health latency from a poller every 50 ms. A table at the end; `--out` writes the JSON.
Exit status 1 when anything was lost or leaked, or the server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak_check import COMPLETED, LOST, REFUSED, judge, sigterm_end  # noqa: E402
from soak_http import exchange  # noqa: E402
from soak_mix import Mix, Spec  # noqa: E402
from soak_watch import HealthPoller, RssSampler, metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"


@dataclass(frozen=True)
class SoakConfig:
    model: str  # "default" (embedded SmolLM2) or anything --model takes
    requests: int
    concurrency: int
    num_slots: int
    max_model_len: int
    max_tokens: int
    burst_tokens: int
    burst: int
    burst_every: int
    retries: int
    warmup: int
    sigterm_streams: int
    sigterm_tokens: int
    huge_stops: int
    dummy_step_time: float
    timeout: float
    max_seconds: float
    seed: int


@dataclass
class Tally:
    """Outcomes of the load phase, by kind, with the lost ones' reasons."""

    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=lambda: defaultdict(Counter))
    answers_503: int = 0
    unsent: int = 0  # left when --max-seconds ran out
    lost: list = field(default_factory=list)
    latencies: list = field(default_factory=list)  # seconds, completed normal requests
    done: int = 0


# ---------------------------------------------------------------- the server


def start_server(cfg: SoakConfig, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lightllm_async.server", "--port", str(port),
           "--num-slots", str(cfg.num_slots), "--max-running-requests", str(cfg.num_slots),
           "--max-model-len", str(cfg.max_model_len)]  # fmt: skip
    if cfg.model != "default":
        cmd += ["--model", cfg.model, "--dummy-step-time", str(cfg.dummy_step_time)]
    pythonpath = os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": pythonpath}
    log = open(os.path.join(_log_dir(), f"soak_server_{port}.log"), "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log_dir() -> str:
    path = os.path.join(ROOT, "perf", "out")
    os.makedirs(path, exist_ok=True)
    return path


async def wait_ready(proc: subprocess.Popen, addr, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        r = await exchange(addr, "GET", "/health", timeout=5)
        if r.status == 200:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("server not ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the load


async def send(cfg: SoakConfig, addr, spec: Spec, tally: Tally) -> None:
    """One request, retried after a 503 as its Retry-After asks, judged and counted."""
    for attempt in range(cfg.retries + 1):
        reply = await exchange(addr, "POST", spec.path, spec.body, spec.leave, cfg.timeout)
        verdict = judge(spec, reply)
        if verdict.outcome != REFUSED:
            break
        tally.answers_503 += 1
        if attempt < cfg.retries:
            await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
    tally.outcomes[verdict.outcome] += 1
    tally.by_kind[spec.kind][verdict.outcome] += 1
    tally.done += 1
    if verdict.outcome == LOST:
        tally.lost.append({"kind": spec.kind, "note": spec.note, "path": spec.path, "reason": verdict.reason,
                           "body": spec.body[:300].decode(errors="replace")})  # fmt: skip
    elif verdict.outcome == COMPLETED and spec.kind == "normal":
        tally.latencies.append(reply.seconds)


def plan(cfg: SoakConfig, mix: Mix) -> list[list[Spec]]:
    """The requests in order; a burst is one group sent at once, the rest are groups of one."""
    groups, n, next_burst = [], 0, cfg.burst_every
    while n < cfg.requests:
        if cfg.burst and n >= next_burst:
            group, next_burst = mix.burst(min(cfg.burst, cfg.requests - n)), next_burst + cfg.burst_every
        else:
            group = [mix.draw()]
        groups.append(group)
        n += len(group)
    return groups


async def run_load(cfg: SoakConfig, addr, proc, rss: RssSampler) -> Tally:
    tally = Tally()
    queue: asyncio.Queue = asyncio.Queue()
    for group in plan(cfg, Mix(cfg.seed, cfg.max_tokens, cfg.burst_tokens, cfg.huge_stops)):
        queue.put_nowait(group)

    deadline = time.monotonic() + cfg.max_seconds

    async def worker() -> None:
        while not queue.empty() and proc.poll() is None and time.monotonic() < deadline:
            group = queue.get_nowait()
            await asyncio.gather(*(send(cfg, addr, spec, tally) for spec in group))
            if tally.done >= cfg.warmup and rss.warm is None:
                rss.mark_warm()
            if tally.done >= cfg.requests // 2 and rss.mid is None:
                rss.mark_mid()

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    while not queue.empty():
        for spec in queue.get_nowait():
            if proc.poll() is None:  # out of time: never sent, not lost
                tally.unsent += 1
                continue
            tally.outcomes[LOST] += 1  # the server died: what it never got is lost too
            tally.by_kind[spec.kind][LOST] += 1
            tally.lost.append({"kind": spec.kind, "reason": "never sent: the server had exited"})
    return tally


async def wait_idle(addr, num_slots: int, timeout: float = 30.0) -> dict[str, float]:
    """/metrics once nothing runs or waits and every slot is back, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(addr)
        idle = m and m["num_requests_running"] + m["num_requests_waiting"] == 0
        if (idle and m["request_slots_free"] == num_slots) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- SIGTERM with streams in flight


async def sigterm_phase(cfg: SoakConfig, addr, proc: subprocess.Popen) -> dict:
    mix = Mix(cfg.seed + 1, cfg.max_tokens, cfg.burst_tokens, cfg.huge_stops)
    n = cfg.sigterm_streams
    specs = [mix.normal("sigterm", stream=i % 4 != 3, max_tokens=cfg.sigterm_tokens) for i in range(n)]
    started = [asyncio.Event() for _ in specs]

    async def one(spec: Spec, first_event: asyncio.Event):
        return await exchange(
            addr, "POST", spec.path, spec.body, timeout=cfg.timeout, on_event=lambda _: first_event.set()
        )

    tasks = [asyncio.create_task(one(s, ev)) for s, ev in zip(specs, started, strict=True)]
    streams = [ev for s, ev in zip(specs, started, strict=True) if s.stream]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in streams)), cfg.timeout)
    in_flight = sum(not t.done() for t in tasks)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    replies = await asyncio.gather(*tasks)
    ends = [sigterm_end(s, r) for s, r in zip(specs, replies, strict=True)]
    exit_code = await asyncio.to_thread(_wait_exit, proc, 30.0)
    return {
        "requests": len(specs),
        "in_flight_at_sigterm": in_flight,
        "complete": ends.count("complete"),
        "error": ends.count("error"),
        "cut": ends.count("cut"),
        "bad": ends.count("bad"),
        "failures": [_failure(s, r) for s, r, e in zip(specs, replies, ends, strict=True) if e in BROKEN],
        "exit_code": exit_code,
        "exit_seconds": round(time.monotonic() - t0, 2),
        "shm_left": os.path.exists(f"/dev/shm/lla-{proc.pid}"),
    }


BROKEN = ("cut", "bad")


def _failure(spec: Spec, reply) -> dict:
    tail = reply.body[-120:].decode(errors="replace")
    return {"path": spec.path, "stream": spec.stream, "status": reply.status, "got_bytes": len(reply.body),
            "wire_error": reply.wire_error, "tail": tail}  # fmt: skip


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return None


# ---------------------------------------------------------------- the run and its report


async def soak(cfg: SoakConfig) -> dict:
    port = free_port()
    addr = (HOST, port)
    proc = start_server(cfg, port)
    try:
        await wait_ready(proc, addr)
        rss = RssSampler(proc.pid)
        health = HealthPoller(addr)
        watchers = [asyncio.create_task(rss.run()), asyncio.create_task(health.run())]
        t0 = time.monotonic()
        tally = await run_load(cfg, addr, proc, rss)
        load_s = time.monotonic() - t0
        m = await wait_idle(addr, cfg.num_slots) if proc.poll() is None else {}
        rss.mark_end()
        health.stop()
        sigterm = await sigterm_phase(cfg, addr, proc) if proc.poll() is None else {"skipped": "server died"}
        orphans = await asyncio.to_thread(rss.alive_children)
        for w in watchers:
            w.cancel()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return report(cfg, tally, load_s, m, rss, health, sigterm, orphans)


def report(cfg, tally: Tally, load_s, m, rss, health, sigterm, orphans) -> dict:
    lat = sorted(tally.latencies)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None  # noqa: E731
    leaked_slots = int(cfg.num_slots - m["request_slots_free"]) if m else None
    leaked_kv = int(m["kv_cache_tokens_total"] - m["kv_cache_tokens_free"]) if m else None
    lost = tally.outcomes[LOST] + sigterm.get("cut", 0) + sigterm.get("bad", 0)
    return {
        "config": asdict(cfg),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "load_seconds": round(load_s, 1),
        "sent": sum(tally.outcomes.values()),
        "unsent_out_of_time": tally.unsent,
        "outcomes": dict(tally.outcomes),
        "answers_503": tally.answers_503,
        "by_kind": {k: dict(v) for k, v in tally.by_kind.items()},
        "lost": lost,
        "lost_by_cause": _causes(tally.lost),
        "lost_examples": tally.lost[:20],
        "leaked_slots": leaked_slots,
        "leaked_kv_tokens": leaked_kv,
        "metrics_idle": m,
        "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "n": len(lat)},
        "health": health.summary(),
        "rss_mb": rss.summary(),
        "rss_series": rss.series(),
        "sigterm": sigterm,
        "orphan_processes": orphans,
    }


def _causes(lost: list[dict]) -> dict[str, int]:
    """Lost answers counted by kind, case and the head of the reason."""
    return dict(Counter(f"{e['kind']} {e.get('note', '')}: {e['reason'][:60]}" for e in lost).most_common())


def print_table(r: dict) -> None:
    o, rss, h, st = r["outcomes"], r["rss_mb"], r["health"], r["sigterm"]
    rows = [
        ("requests sent", f"{r['sent']}   (not sent, out of time: {r['unsent_out_of_time']})"),
        ("completed", o.get("completed", 0)),
        ("refused (503, after retries)", f"{o.get('refused', 0)}   (503 answers: {r['answers_503']})"),
        ("client errors (4xx)", o.get("client_error", 0)),
        ("disconnected on purpose", o.get("disconnected", 0)),
        ("LOST (load + SIGTERM cut/bad)", r["lost"]),
        ("leaked slots / KV tokens", f"{r['leaked_slots']} / {r['leaked_kv_tokens']}"),
        ("latency p50 / p99 (normal)", f"{r['latency_ms']['p50']} / {r['latency_ms']['p99']} ms"),
        ("worst /health latency", f"{h['worst_ms']} ms over {h['polls']} polls ({h['failures']} failed)"),
    ]
    for name, s in rss.items():
        growth = f"growth after warm-up {s['growth_after_warmup']}, second half {s['growth_second_half']}"
        rows.append((f"RSS {name} start/warm/end", f"{s['start']} / {s['warm']} / {s['end']} MB  ({growth})"))
    if "exit_code" in st:
        ends = f"{st['complete']} complete, {st['error']} error, {st['cut']} cut, {st['bad']} bad"
        rows.append(("SIGTERM in flight", f"{st['in_flight_at_sigterm']} of {st['requests']}: {ends}"))
        exit_ = f"code {st['exit_code']} in {st['exit_seconds']} s, shm left: {st['shm_left']}"
        rows.append(("SIGTERM exit", exit_))
    rows.append(("load duration", f"{r['load_seconds']} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for cause, n in r["lost_by_cause"].items():
        print(f"  lost {n:5d} x {cause}")


def failed(r: dict) -> list[str]:
    why = []
    if r["lost"]:
        why.append(f"{r['lost']} lost")
    if r["leaked_slots"] != 0 or r["leaked_kv_tokens"] != 0:
        why.append(f"leaked {r['leaked_slots']} slots, {r['leaked_kv_tokens']} KV tokens")
    st = r["sigterm"]
    if st.get("exit_code") != 0 or st.get("shm_left") or r["orphan_processes"]:
        left = f"shm left {st.get('shm_left')}, orphans {r['orphan_processes']}"
        why.append(f"unclean stop: exit {st.get('exit_code')}, {left}")
    return why


def parse_args(argv=None) -> SoakConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2, CPU), 'dummy', or a path")
    p.add_argument("--ci", action="store_true", help="bounded mode: --model dummy, 300 requests, < 2 min")
    p.add_argument("--requests", type=int, default=None, help="default 10000 (300 with --ci)")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--num-slots", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None, help="default 4096 dummy, 512 otherwise")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="upper bound of a normal request's max_tokens"
    )
    p.add_argument("--burst-tokens", type=int, default=None, help="max_tokens of burst and SIGTERM streams")
    p.add_argument("--burst", type=int, default=None, help="requests per burst (default 2 x slots)")
    p.add_argument("--burst-every", type=int, default=200)
    p.add_argument("--retries", type=int, default=3, help="retries of a 503, after its Retry-After")
    p.add_argument("--warmup", type=int, default=None, help="requests before the 'warm' RSS sample")
    p.add_argument("--sigterm-streams", type=int, default=8)
    p.add_argument("--sigterm-tokens", type=int, default=None, help="their max_tokens (default: the context)")
    p.add_argument("--huge-stops", type=int, default=2000, help="stop strings in the huge-stop-list case")
    p.add_argument("--dummy-step-time", type=float, default=0.001)
    p.add_argument("--timeout", type=float, default=None, help="seconds one answer may take (a hang beyond)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop sending after (4 h; --ci 120 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    a = p.parse_args(argv)
    model = "dummy" if a.ci and a.model == "default" else a.model
    dummy = model == "dummy"
    requests = a.requests or (300 if a.ci else 10_000)
    max_model_len = a.max_model_len or (4096 if dummy else 512)
    cfg = SoakConfig(
        model=model,
        requests=requests,
        concurrency=a.concurrency,
        num_slots=a.num_slots,
        max_model_len=max_model_len,
        max_tokens=a.max_tokens or (64 if dummy else 16),
        burst_tokens=a.burst_tokens or (400 if dummy else 48),
        burst=a.burst if a.burst is not None else 2 * a.num_slots,
        burst_every=a.burst_every,
        retries=a.retries,
        warmup=a.warmup if a.warmup is not None else max(20, requests // 20),
        sigterm_streams=a.sigterm_streams,
        sigterm_tokens=a.sigterm_tokens or max_model_len - 128,
        huge_stops=a.huge_stops,
        dummy_step_time=a.dummy_step_time,
        timeout=a.timeout or (30.0 if dummy else 300.0),
        max_seconds=a.max_seconds or (120.0 if a.ci else 4 * 3600.0),
        seed=a.seed,
    )
    return cfg, a.out


def main(argv=None) -> int:
    cfg, out = parse_args(argv)
    r = asyncio.run(soak(cfg))
    print_table(r)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(r, f, indent=1, default=str)
    why = failed(r)
    if why:
        print("FAIL:", "; ".join(why))
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
