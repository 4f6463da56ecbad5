"""What the soak watches beside its load: RSS of the server's processes from /proc every second,
/health every 50 ms, and /metrics on demand."""

from __future__ import annotations

import asyncio
import os
import time

from soak_http import exchange

PAGE_MB = 1 / 1024  # /proc status reports kB


async def metrics(addr) -> dict[str, float]:
    """The `lightllm_*` samples of /metrics without labels, by name less the prefix; {} on failure."""
    r = await exchange(addr, "GET", "/metrics", timeout=10)
    if r.status != 200:
        return {}
    out = {}
    for line in r.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("lightllm_async:") and "{" not in name:
            out[name.removeprefix("lightllm_async:")] = float(value)
    return out


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, and RssAnon: the private part, without the shared region and mapped files, whose
    pages count in RSS once touched."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    out["" if line.startswith("VmRSS") else "_anon"] = int(line.split()[1]) * PAGE_MB
    except OSError:
        return {}
    return out


def _label(pid: int, root: int) -> str:
    if pid == root:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "gone"
    return "resource_tracker" if b"resource_tracker" in cmd else "engine"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RssSampler:
    """RSS of the server and its descendants (the engine), sampled every second: `server`,
    `engine` (VmRSS) and `server_anon`, `engine_anon` (RssAnon)."""

    def __init__(self, root: int, period: float = 1.0):
        self.root = root
        self.period = period
        self.seen: dict[int, str] = {}  # every process of the tree seen, by pid: its label
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.t0 = time.monotonic()
        self.warm: dict[str, float] | None = None
        self.mid: dict[str, float] | None = None  # half the requests answered
        self.end: dict[str, float] | None = None

    def sample(self) -> dict[str, float]:
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += _children(pid)
        now = {}
        for pid in pids:
            label = _label(pid, self.root)
            self.seen.setdefault(pid, label)
            if label == "resource_tracker":
                continue
            for suffix, mb in _memory_mb(pid).items():
                now[label + suffix] = round(now.get(label + suffix, 0.0) + mb, 1)
        self.samples.append((round(time.monotonic() - self.t0, 1), now))
        return now

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period)

    def mark_warm(self) -> None:
        self.warm = self.sample()

    def mark_mid(self) -> None:
        self.mid = self.sample()

    def mark_end(self) -> None:
        self.end = self.sample()

    def alive_children(self, wait: float = 5.0) -> dict[int, str]:
        """Processes of the tree still alive `wait` seconds after the server exited."""
        deadline = time.monotonic() + wait
        while True:
            alive = {pid: label for pid, label in self.seen.items() if pid != self.root and _alive(pid)}
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def summary(self) -> dict[str, dict]:
        start = self.samples[0][1] if self.samples else {}
        out = {}
        for name in start:
            series = [s[name] for _, s in self.samples if name in s]
            warm, mid, end = ((m or {}).get(name) for m in (self.warm, self.mid, self.end))
            out[name] = {
                "start": start[name], "warm": warm, "mid": mid, "end": end, "max": max(series),
                "growth_after_warmup": _diff(end, warm), "growth_second_half": _diff(end, mid),
            }  # fmt: skip
        return out

    def series(self) -> list[list]:
        """[seconds, server, engine, server_anon, engine_anon] (MB) per sample."""
        names = ("server", "engine", "server_anon", "engine_anon")
        return [[t, *(s.get(n) for n in names)] for t, s in self.samples]


class HealthPoller:
    """GET /health every `period` seconds on a fresh connection, as a supervisor's probe would."""

    def __init__(self, addr, period: float = 0.05):
        self.addr = addr
        self.period = period
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            r = await exchange(self.addr, "GET", "/health", timeout=60)
            self.latencies.append(r.seconds)
            if r.status != 200:
                self.failures.append(f"{r.status} {r.wire_error}".strip())
            await asyncio.sleep(self.period)

    def stop(self) -> None:
        self._stop = True

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
        return {
            "polls": len(lat),
            "worst_ms": round(lat[-1] * 1000, 1) if lat else None,
            "p99_ms": round(p99 * 1000, 1) if lat else None,
            "failures": len(self.failures),
            "failure_examples": self.failures[:5],
        }
