"""Closed-loop serving benchmark against a running server, in the shape of LightLLM's published one.

N clients (default 100) each send a streaming `/v1/completions` request and, as soon as it ends,
the next one. Prompts are `--input-len` random token ids (sent as a list of ints, so no tokenizer is
needed); output lengths are Gaussian (mean 128, std 128) clipped to [2, 256] and forced with
`ignore_eos`. Measures QPS, input/output tokens per second, and p50/p90/p99 of time to first token
(TTFT), time per output token (TPOT = (e2e - ttft) / (n_out - 1)) and end-to-end latency.

    python -m lightllm_async.server --model PATH --port 8000 --max-running-requests 128 &
    python perf/serve_bench.py --url http://127.0.0.1:8000 --clients 100 --num-requests 500 \
        --warmup 100 --out results.json
    python perf/plot_serve.py results.json            # latency distributions as a PNG

Steady state (`--protocol steady`, the default): the clients never pause. The first `--warmup`
requests are not counted, nor are the last `--clients` ones, which keep every client busy while the
counted ones finish. The window runs from the end of the last warm-up request (or the first counted
send, if later) to the last counted send: the warm-up itself starts every client at once, and until
it has drained the server is not in its steady mix (the first H200 run of this protocol opened the
window at the first counted send: 484 prompts began and 400 requests ended in its 16.5 s, input
tokens/s 21% high). Throughput is what arrived in the window (tokens by their arrival, prompts by
their first token, requests by their end), latencies are those of the counted requests sent in it.
Give it room: `--num-requests` ~8 x `--clients`.

`--protocol barrier` is how this script measured until 2026-11-30: the warm-up requests, a wait for
all of them, then `--num-requests` sent from a standing start (every client at once) and drained to
the last, all counted over that whole time. The standing start queues every client's prompt at once,
which sets TTFT p90/p99 (1.8 / 2.6 s on an H200 at 100 clients, 1024 in, where the steady window has
0.17 / 0.22 s) and the drain's tail of a few long decodes lowers its throughput (7–8% below steady
state on that card, 2026-11-30).

With `--duration S` clients start new requests for S seconds; those in flight then still finish and
count, and the run's duration is measured to the last finish (the barrier protocol's accounting).
Standard library + numpy only: the HTTP/1.1 client (keep-alive, chunked transfer, SSE) is the few
functions below.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

PERCENTILES = (50, 90, 99)
API_PATHS = {"openai": "/v1/completions", "native": "/generate_stream"}


@dataclass(frozen=True)
class BenchConfig:
    url: str
    clients: int
    num_requests: int
    duration: float | None
    input_len: int
    output_mean: float
    output_std: float
    output_min: int
    output_max: int
    id_low: int
    id_high: int
    warmup: int
    seed: int
    request_timeout: float
    api: str = "openai"
    tokenizer: str | None = None
    model: str = ""
    shared_prefix: int = 0  # tokens every prompt starts with (a system prompt), before input_len unique
    protocol: str = "steady"  # or "barrier" (see the module docstring)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: list[int] | str  # token ids (openai), text (native)
    prompt_len: int  # tokens asked for; the server's count is recorded
    max_tokens: int


@dataclass
class Record:
    """One request's outcome; times in seconds, `start` from the phase start, the rest from `start`."""

    index: int
    prompt_len: int
    max_tokens: int
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each event with output
    token_events: int = 0  # events that carried new output (openai: text; native: a token)
    usage_tokens: int | None = None  # completion_tokens of the final usage chunk
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.token_events

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if self.error or self.ttft is None or self.e2e is None or n < 2:
            return None
        return (self.e2e - self.ttft) / (n - 1)


# ---------------------------------------------------------------- workload


class Workload:
    """Hands out requests to the clients: `count` of them, or until `deadline` (perf_counter).

    With a count, every request is made before the phase starts: making a text prompt runs the
    tokenizer (~10 ms for 2,000 tokens), and done in the clients' one event loop while others'
    responses stream, it delayed their reading and inflated the TTFT and TPOT this reports (by
    hundreds of ms at 50 requests/s with 2,100-token prompts). A shared prefix's text is made once."""

    def __init__(
        self,
        cfg: BenchConfig,
        seed: int,
        count: int | None,
        deadline: float | None = None,
        to_text: Callable[[list[int]], str] | None = None,
    ):
        self.cfg, self.count, self.deadline, self.to_text = cfg, count, deadline, to_text
        self.rng = np.random.default_rng(seed)
        self.issued = 0
        # the same for every request and every run: a fixed seed, not the workload's
        self.prefix = (
            np.random.default_rng(1234).integers(cfg.id_low, cfg.id_high, cfg.shared_prefix).tolist()
        )
        self.prefix_text = to_text(self.prefix) if to_text and self.prefix else ""
        self.ready = [self._make(i) for i in range(count)] if count is not None else None

    def _make(self, index: int) -> RequestSpec:
        cfg = self.cfg
        unique = self.rng.integers(cfg.id_low, cfg.id_high, size=cfg.input_len).tolist()
        out_len = round(float(self.rng.normal(cfg.output_mean, cfg.output_std)))
        max_tokens = int(np.clip(out_len, cfg.output_min, cfg.output_max))
        prompt = self.prefix_text + self.to_text(unique) if self.to_text else self.prefix + unique
        return RequestSpec(index, prompt, cfg.shared_prefix + cfg.input_len, max_tokens)

    def next(self) -> RequestSpec | None:
        if self.count is not None and self.issued >= self.count:
            return None
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        spec = self.ready[self.issued] if self.ready is not None else self._make(self.issued)
        self.issued += 1
        return spec


# ---------------------------------------------------------------- HTTP/1.1 client


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after an error or a `Connection: close`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        """Send a POST; return the status and an iterator over the body's pieces as they arrive.

        The caller must drain the iterator before the next request on this connection."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode("latin-1") + body)
        await self.writer.drain()
        status, headers = await _read_head(self.reader)
        return status, _read_body(self.reader, headers, self)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("server closed the connection")
    status = int(line.split(b" ", 2)[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], conn: Connection
) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := _chunk_size(await reader.readline()):
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # trailers
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:  # delimited by close
        while data := await reader.read(65536):
            yield data
        await conn.close()
    if headers.get("connection", "").lower() == "close":
        await conn.close()


def _chunk_size(line: bytes) -> int:
    if not line:
        raise ConnectionError("connection closed inside a chunked body")
    return int(line.split(b";")[0].strip(), 16)


async def sse_events(body: AsyncIterator[bytes]) -> AsyncIterator[tuple[float, bytes]]:
    """(arrival time, payload) of each `data:` line, up to `[DONE]`; drains the body to its end."""
    buf, done = b"", False
    async for piece in body:
        now = time.perf_counter()
        buf += piece
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if done or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            done = payload == b"[DONE]"
            if not done:
                yield now, payload


# ---------------------------------------------------------------- one request, one client


def text_prompts(cfg: BenchConfig) -> Callable[[list[int]], str]:
    """For --api native, which takes text: random ids → text of about `input_len` tokens."""
    from tokenizers import Tokenizer

    path = cfg.tokenizer or ""
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)
    high = min(cfg.id_high, tok.get_vocab_size())
    low = min(cfg.id_low, high // 2)  # a small vocabulary: fold the range into it

    def to_text(ids: list[int]) -> str:
        n = len(ids)
        ids = [low + (i - cfg.id_low) % (high - low) for i in ids]
        # decoded ids re-encode to fewer tokens (merges): decode twice as many, then cut
        text = tok.decode(ids + ids)
        return tok.decode(tok.encode(text, add_special_tokens=False).ids[:n])

    return to_text


def request_body(cfg: BenchConfig, spec: RequestSpec) -> bytes:
    if cfg.api == "native":
        params = {"max_new_tokens": spec.max_tokens, "do_sample": False, "ignore_eos": True}
        return json.dumps({"inputs": spec.prompt, "parameters": params}).encode()
    return json.dumps(
        {
            "model": cfg.model,
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def _take_event(rec: Record, elapsed: float, event: dict) -> None:
    """Fold one SSE event of either API into the record; `elapsed` is its arrival after sending."""
    if "error" in event:
        rec.error = str(event["error"].get("message", event["error"]))
    new_output = bool(event.get("choices"))  # openai: one choice with text and/or finish_reason
    if usage := event.get("usage"):  # openai, last event with stream_options.include_usage
        rec.usage_tokens, rec.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    if token := event.get("token"):  # native: one event per token; a bare finish repeats the count
        new_output = token["count_output_tokens"] != rec.usage_tokens
        rec.usage_tokens, rec.prompt_tokens = token["count_output_tokens"], token["prompt_tokens"]
    if new_output:
        rec.ttft = elapsed if rec.ttft is None else rec.ttft
        rec.chunk_times.append(elapsed)
        rec.token_events += bool(token or event["choices"][0].get("text"))


async def run_request(conn: Connection, cfg: BenchConfig, spec: RequestSpec, t0: float) -> Record:
    rec = Record(spec.index, spec.prompt_len, spec.max_tokens)
    sent = time.perf_counter()
    rec.start = sent - t0
    try:
        async with asyncio.timeout(cfg.request_timeout):
            status, body = await conn.post(API_PATHS[cfg.api], request_body(cfg, spec))
            if status != 200:
                rec.error = f"HTTP {status}: " + b"".join([p async for p in body]).decode(errors="replace")
                return rec
            async for now, payload in sse_events(body):
                _take_event(rec, now - sent, json.loads(payload))
        rec.e2e = time.perf_counter() - sent
        if rec.ttft is None and rec.error is None:
            rec.error = "stream ended without output"
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, KeyError, TypeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        await conn.close()  # its state is unknown
    return rec


async def client_loop(cfg: BenchConfig, workload: Workload, records: list[Record], t0: float) -> None:
    host_port = urlsplit(cfg.url)
    conn = Connection(host_port.hostname or "127.0.0.1", host_port.port or 80)
    try:
        while (spec := workload.next()) is not None:
            records.append(await run_request(conn, cfg, spec, t0))
    finally:
        await conn.close()


async def run_phase(cfg: BenchConfig, workload: Workload, clients: int) -> tuple[list[Record], float]:
    """Run `clients` closed-loop clients until the workload is exhausted; (records, seconds)."""
    records: list[Record] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(cfg, workload, records, t0) for _ in range(clients)))
    return sorted(records, key=lambda r: r.index), time.perf_counter() - t0


LAG_TICK_S = 0.005


async def loop_lag(lags: list[float]) -> None:
    """How late this process's event loop wakes a 5 ms timer, until cancelled: a busy client loop
    reads response events late, and every TTFT and TPOT it reports is late by as much."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        lags.append(time.perf_counter() - start - LAG_TICK_S)


# ---------------------------------------------------------------- report


def stats(values: list[float], scale: float) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values) * scale
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def steady_window(records: list[Record], warmup: int, counted: int) -> tuple[list[Record], dict]:
    """The window [lo, hi] and what every record delivered in it: {"window_s", "completed",
    "prompts", "input_tokens", "output_tokens"}, output tokens by the arrival of the events that
    carried them (a request's tokens spread evenly over its events), a prompt when its first token
    came, a request when it ended; and the measured records, the counted ones (index in [warmup,
    warmup + counted)) sent inside the window. hi is the last counted send (the tail requests keep
    every client busy to there); lo is the first counted send, or if later, the end of the last
    warm-up request: the warm-up starts every client at once, and until its last request is done
    the server is still draining that standing start (its burst of prompts first, then a lockstep
    decode), not in the steady mix a window should measure."""
    in_range = [r for r in records if warmup <= r.index < warmup + counted]
    counted_ok = [r for r in in_range if r.error is None]
    empty = {"window_s": 0.0, "completed": 0, "prompts": 0, "input_tokens": 0, "output_tokens": 0.0}
    if not counted_ok:
        return in_range, empty
    warm_ends = [r.start + r.e2e for r in records if r.index < warmup and r.e2e is not None]
    lo = max([min(r.start for r in counted_ok), *warm_ends])
    hi = max(r.start for r in counted_ok)
    measured = [r for r in in_range if lo <= r.start <= hi]
    if hi <= lo:
        return measured, empty
    done = [r for r in records if r.error is None and r.ttft is not None and r.e2e is not None]
    out_tokens = 0.0
    for r in done:
        if r.chunk_times:
            per_event = r.output_tokens / len(r.chunk_times)
            out_tokens += per_event * sum(lo <= r.start + t <= hi for t in r.chunk_times)
    firsts = [r for r in done if lo <= r.start + r.ttft <= hi]
    return measured, {
        "window_s": hi - lo,
        "completed": sum(lo <= r.start + r.e2e <= hi for r in done),
        "prompts": len(firsts),
        "input_tokens": sum(r.prompt_tokens or r.prompt_len for r in firsts),
        "output_tokens": out_tokens,
    }


def summarize(records: list[Record], duration: float, window: dict | None = None) -> dict:
    """Over `records` and `duration`; with a steady `window` (steady_window), throughput from it and
    the latencies of `records` (the counted ones)."""
    ok = [r for r in records if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or r.prompt_len for r in ok)
    completed = len(ok)
    if window is not None:
        duration, completed = window["window_s"], window["completed"]
        in_tokens, out_tokens = window["input_tokens"], round(window["output_tokens"])
    duration = max(duration, 1e-9)
    return {
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "duration_s": duration,
        "qps": completed / duration,
        "input_tokens_per_s": in_tokens / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "output_len_mismatches": sum(r.output_tokens != r.max_tokens for r in ok),
        "chunks_per_token": sum(len(r.chunk_times) for r in ok) / max(out_tokens, 1),
        "ttft_ms": stats([r.ttft for r in ok], 1e3),
        "tpot_ms": stats([t for r in ok if (t := r.tpot) is not None], 1e3),
        "e2e_s": stats([r.e2e for r in ok], 1.0),
        "first_errors": sorted({r.error for r in records if r.error})[:5],
    }


def print_table(cfg: BenchConfig, s: dict) -> None:
    def row(name: str, d: dict, unit: str) -> str:
        cells = "".join(f"{d[k]:>10.2f}" if d[k] is not None else f"{'-':>10}" for k in d)
        return f"  {name:<10}{cells}   {unit}"

    print(
        f"\n{cfg.clients} clients, input {cfg.shared_prefix} shared + {cfg.input_len}, "
        f"output ~N({cfg.output_mean:g}, {cfg.output_std:g}) in [{cfg.output_min}, {cfg.output_max}], "
        f"model {cfg.model!r}, api {cfg.api}"
    )
    how = "a steady window of" if s.get("protocol") == "steady" else "in"
    print(f"  requests   {s['requests_ok']} ok, {s['requests_failed']} failed; {how} {s['duration_s']:.2f} s")
    if (w := s.get("window")) is not None:
        if w["window_s"] <= 0:
            print(
                "  warning: no steady window (the warm-up outlasted the counted sends): raise --num-requests"
            )
        else:
            print(
                f"  window     {w['prompts']} prompts began, {w['completed']} ended (near-equal when steady)"
            )
    print(f"  QPS        {s['qps']:.2f}")
    print(f"  tokens/s   input {s['input_tokens_per_s']:.0f}, output {s['output_tokens_per_s']:.0f}")
    print(f"  {'':<10}" + "".join(f"{k:>10}" for k in s["ttft_ms"]))
    print(row("TTFT", s["ttft_ms"], "ms"))
    print(row("TPOT", s["tpot_ms"], "ms"))
    print(row("E2E", s["e2e_s"], "s"))
    if "client_loop_lag_ms" in s:
        print(
            row(
                "loop lag",
                s["client_loop_lag_ms"],
                "ms (this client's event loop: what TTFT and TPOT may be late by)",
            )
        )
    if s["requests_ok"] and s["chunks_per_token"] < 0.95:
        print(
            f"  note: {s['chunks_per_token']:.2f} events per token: tokens that decode to no text arrive "
            "with a later event, so TTFT and TPOT are measured at text (--api native: per token)"
        )
    if s["output_len_mismatches"]:
        print(f"  warning: {s['output_len_mismatches']} requests did not produce max_tokens tokens")
    for err in s["first_errors"]:
        print(f"  error: {err[:200]}")


# ---------------------------------------------------------------- main


def served_model(url: str, wait_s: float) -> str:
    """The first model of /v1/models, polling until the server answers or `wait_s` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=5) as resp:
                return json.load(resp)["data"][0]["id"]
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=100, help="concurrent closed-loop clients")
    p.add_argument("--num-requests", type=int, default=500, help="requests in all (unless --duration)")
    p.add_argument("--duration", type=float, default=None, help="seconds to keep issuing requests")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument(
        "--shared-prefix", type=int, default=0, help="tokens every prompt starts with, before --input-len own"
    )
    p.add_argument("--output-mean", type=float, default=128)
    p.add_argument("--output-std", type=float, default=128)
    p.add_argument("--output-min", type=int, default=2)
    p.add_argument("--output-max", type=int, default=256)
    p.add_argument("--id-low", type=int, default=1000, help="prompt token ids are drawn from [low, high)")
    p.add_argument("--id-high", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=10, help="requests sent first and not counted")
    p.add_argument(
        "--protocol",
        choices=["steady", "barrier"],
        default="steady",
        help="steady: no pause after the warm-up, throughput over a window with every client busy;"
        " barrier: the measured requests from a standing start, drained (before 2026-11-30)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for the server")
    p.add_argument(
        "--api",
        default="openai",
        choices=list(API_PATHS),
        help="openai: /v1/completions with token ids; native: /generate_stream, one event per token",
    )
    p.add_argument("--tokenizer", default=None, help="--api native: the model folder, to make text prompts")
    p.add_argument("--out", default=None, help="write config, summary and records as JSON here")
    args = p.parse_args(argv)
    if args.api == "native" and not args.tokenizer:
        p.error("--api native sends text: give --tokenizer (the model folder)")
    return args


def steady(cfg: BenchConfig) -> bool:
    return cfg.protocol == "steady" and not cfg.duration


async def bench(cfg: BenchConfig, lags: list[float]) -> tuple[list[Record], float]:
    """Steady: one phase of warm-up + counted + tail requests, every record returned (`summarize`
    picks the counted ones and the window). Barrier: the warm-up phase, then the measured one.
    `lags` gets the client loop's lag during the measured phase."""
    to_text = text_prompts(cfg) if cfg.api == "native" else None
    if steady(cfg):
        total = cfg.warmup + cfg.num_requests + cfg.clients
        workload = Workload(cfg, cfg.seed, total, None, to_text)
    else:
        if cfg.warmup:
            warmup = Workload(cfg, cfg.seed + 1, cfg.warmup, to_text=to_text)
            warm, _ = await run_phase(cfg, warmup, min(cfg.clients, cfg.warmup))
            if failed := [r for r in warm if r.error]:
                print(f"warmup: {len(failed)} of {len(warm)} failed: {failed[0].error}", file=sys.stderr)
        deadline = time.perf_counter() + cfg.duration if cfg.duration else None
        count = None if cfg.duration else cfg.num_requests
        workload = Workload(cfg, cfg.seed, count, deadline, to_text)
    watch = asyncio.create_task(loop_lag(lags))
    try:
        return await run_phase(cfg, workload, cfg.clients)
    finally:
        watch.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg = dataclasses.replace(cfg, model=served_model(cfg.url, args.wait_ready))
    lags: list[float] = []
    records, duration = asyncio.run(bench(cfg, lags))
    measured = records
    if steady(cfg):
        measured, window = steady_window(records, cfg.warmup, cfg.num_requests)
        summary = summarize(measured, duration, window)
        summary["window"] = window
    else:
        summary = summarize(records, duration)
    summary["protocol"] = "steady" if steady(cfg) else "barrier"
    summary["client_loop_lag_ms"] = stats(lags, 1e3)
    if args.out:
        ids = {id(r) for r in measured}  # every request's record, the measured ones marked
        recs = [
            {
                **dataclasses.asdict(r),
                "output_tokens": r.output_tokens,
                "tpot": r.tpot,
                "measured": id(r) in ids,
            }
            for r in records
        ]
        with open(args.out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "summary": summary, "records": recs}, f)
    print_table(cfg, summary)
    return 0 if summary["requests_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
