"""The server's own overhead over HTTP: `--model dummy` (no weights, a step costs only the loop)
against closed-loop clients, non-streaming and streaming (SSE), at several concurrencies.

    python perf/http_bench.py                           # starts its own dummy server, ~1 min
    python perf/http_bench.py --url http://127.0.0.1:8000 --concurrency 1,64
    python perf/http_bench.py --out perf/out/http_bench.json

Each row runs `--seconds` after a warm-up: C clients each send a request on a keep-alive
connection and, when it ends, the next. Prompts are `--prompt-len` token ids (no tokenizer in the
way); non-streaming requests ask for `--max-tokens` tokens, streaming ones for
`--stream-tokens`, with ignore_eos. Reported: requests/s, output tokens/s and, for streams,
SSE events/s. The client runs in this process, on the same CPUs as the server: on a small
machine its cost is part of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_bench import Connection, sse_events  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def start_server(port: int, max_clients: int, step_time: float) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "lightllm_async.server", "--model", "dummy", "--port", str(port),
        "--dummy-step-time", str(step_time), "--num-slots", str(max_clients + 64),
        "--max-running-requests", str(max_clients), "--max-num-batched-tokens", "65536",
        "--max-model-len", "1024", "--log-level", "warning",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server not ready")


async def one_request(conn: Connection, body: bytes, stream: bool) -> tuple[int, int]:
    """(output tokens, SSE events) of one request; raises on an HTTP error."""
    status, chunks = await conn.post("/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: " + b"".join([c async for c in chunks]).decode(errors="replace"))
    if not stream:
        data = json.loads(b"".join([c async for c in chunks]))
        return data["usage"]["completion_tokens"], 0
    tokens = events = 0
    async for _, payload in sse_events(chunks):
        event = json.loads(payload)
        events += 1
        if usage := event.get("usage"):
            tokens = usage["completion_tokens"]
    return tokens, events


async def run_row(url: str, clients: int, stream: bool, args: argparse.Namespace) -> dict:
    host = urlsplit(url)
    prompt = [(i * 7919) % 900 + 50 for i in range(args.prompt_len)]
    max_tokens = args.stream_tokens if stream else args.max_tokens
    body = json.dumps(
        {
            "model": "dummy",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }  # fmt: skip
    ).encode()
    totals = {"requests": 0, "tokens": 0, "events": 0, "errors": 0}
    counting = False

    async def client(stop_at: float) -> None:
        nonlocal counting
        conn = Connection(host.hostname or "127.0.0.1", host.port or 80)
        try:
            while time.perf_counter() < stop_at:
                try:
                    tokens, events = await one_request(conn, body, stream)
                except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError):
                    totals["errors"] += counting
                    await conn.close()
                    continue
                if counting:
                    totals["requests"] += 1
                    totals["tokens"] += tokens
                    totals["events"] += events
        finally:
            await conn.close()

    start = time.perf_counter()
    stop_at = start + args.warmup + args.seconds
    tasks = [asyncio.create_task(client(stop_at)) for _ in range(clients)]
    await asyncio.sleep(args.warmup)
    counting, t0 = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0  # requests in flight at the end finish and count
    return {
        "clients": clients,
        "stream": stream,
        "req_per_s": totals["requests"] / elapsed,
        "tokens_per_s": totals["tokens"] / elapsed,
        "events_per_s": totals["events"] / elapsed,
        **totals,
        "seconds": elapsed,
    }


def fmt_table(rows: list[dict]) -> str:
    lines = [f"{'clients':>8}  {'mode':<14}{'req/s':>10}{'tokens/s':>12}{'events/s':>11}{'errors':>8}"]
    for r in rows:
        mode = f"stream {r['max_tokens']}" if r["stream"] else f"non-stream {r['max_tokens']}"
        lines.append(f"{r['clients']:>8}  {mode:<14}{r['req_per_s']:>10.0f}{r['tokens_per_s']:>12.0f}"
                     f"{r['events_per_s']:>11.0f}{r['errors']:>8}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start a dummy one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--concurrency", default="1,64,512")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per non-streaming request")
    p.add_argument("--stream-tokens", type=int, default=256, help="tokens per streaming request")
    p.add_argument("--step-time", type=float, default=0.0, help="--dummy-step-time of the server")
    p.add_argument("--out", default="perf/out/http_bench.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    proc = None if args.url else start_server(args.port, max(levels), args.step_time)
    url = args.url or f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        wait_ready(url, proc)
        for clients in levels:
            for stream in (False, True):
                r = uvloop.run(run_row(url, clients, stream, args))
                r["max_tokens"] = args.stream_tokens if stream else args.max_tokens
                rows.append(r)
                mode = "stream" if stream else "plain"
                progress = f"req/s {r['req_per_s']:.0f} tokens/s {r['tokens_per_s']:.0f} errors {r['errors']}"
                print(f"  {clients:>4} {mode:<7} {progress}", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    table = fmt_table(rows)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "table": table}, f, indent=1)
    return 0 if all(r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
