"""The engine's real scheduler (and radix prefix cache) under a closed-loop load, on a simulated
clock whose step times come from a cost model of one GPU (issue 10: which chunk budget, and what
TTFT a shared prefix can reach). No torch, no device, no HTTP: a step lasts

    max(weights, (decode rows + prefill tokens) x FLOPs per token / matmul rate)
      + KV bytes read / copy rate + attention pairs x FLOPs per pair / attention rate + fixed

with the constants of Llama-3-8B (bf16) on an H200 by default (measured: 4.2 TB/s copy, ~650
TFLOP/s matmul, prefill attention ~370 TFLOP/s; perf/RESULTS.md), and each request's first token
counted when the step that samples it ends, plus a fixed client/HTTP delay each way. A model, not a
measurement: it says where scheduling alone puts TTFT, not what a server reaches.

    python perf/prefix_sim.py                       # the shared-prefix workload, cache on/off x chunks
    python perf/prefix_sim.py --workload 1024in     # 1024 in, N(128,128) out clipped to [2, 256]
    python perf/prefix_sim.py --workload 1024in --dp 2 --chunks 1024,512,384,256 --host-ms 9 --bucket 128
                                                    # one GPU against two replicas sharing the clients

--host-ms and --bucket model what the H200's mixed steps add (perf/RESULTS.md, 2026-11-30: ~9 ms of
host work a step with prefill chunks; piecewise graphs padded to 128 tokens).

--gemm-table FILE replaces the projections' term (weights or FLOPs, whichever is longer) by the
times perf/gemm_rows_bench.py measured on a card (its printed table: rows -> ms of a step's
projections), interpolated between its rows and extended past its last by FLOPs at its last
ratio; below its first rows, weights or FLOPs at the first row's ratio. cuBLAS runs a few hundred
rows well below the matmul rate, which the FLOPs term does not know.

    python perf/prefix_sim.py --workload 1024in --dp 2 --chunks 1024,512,384,256 --host-ms 9 --bucket 128 \
        --gemm-table perf/data/gemm_rows_h200_2026-12-01_call8.log
"""

from __future__ import annotations

import argparse
import bisect
import copy
import heapq
import itertools
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lightllm_async.batch import Sampled  # noqa: E402
from lightllm_async.engine.request import Request  # noqa: E402
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from lightllm_async.types import SamplingParams  # noqa: E402

# Llama-3-8B bf16 on an H200 (perf/RESULTS.md, 2026-11-30): 16.06 GB of weights at 4.2 TB/s,
# 2 x 8.03 GFLOP a token at ~650 TFLOP/s, 128 KiB of KV a token, attention 4 x 32 heads x 128 dims
# FLOPs a (query, key) pair at ~370 TFLOP/s, ~0.7 ms a step of norms, sampling and gaps.
WEIGHTS_S = 16.06e9 / 4.2e12
TOKEN_S = 16.06e9 / 650e12
KV_TOKEN_S = 131072 / 4.2e12  # bf16; --kv-cache-dtype fp8 halves it (--fp8-kv)
PAIR_S = 4 * 32 * 128 / 370e12
FIXED_S = 0.7e-3
CLIENT_S = 1.5e-3  # request in (HTTP, parse, tokenize) and token out, each way


def read_gemm_table(path: str) -> list[tuple[int, float]]:
    """(rows, seconds of a step's projections) from perf/gemm_rows_bench.py's printed table."""
    rows = []
    with open(path) as f:
        for line in f:
            cols = line.split()
            if len(cols) == 8 and cols[0].isdigit():
                rows.append((int(cols[0]), float(cols[5]) / 1e3))
    if not rows:
        raise ValueError(f"{path}: no rows of perf/gemm_rows_bench.py's table")
    return sorted(rows)


def gemm_seconds(rows: int, table: list[tuple[int, float]] | None) -> float:
    """The projections' time for a step of `rows` rows: the cost model's, or the measured table's."""
    if table is None:
        return max(WEIGHTS_S, rows * TOKEN_S)
    (m0, t0), (m1, t1) = table[0], table[-1]
    if rows <= m0:  # weights, or FLOPs at the first row's cost a row
        return max(WEIGHTS_S, rows * t0 / m0)
    if rows >= m1:
        return rows * t1 / m1
    i = bisect.bisect_left(table, (rows,))  # table[i - 1][0] < rows <= table[i][0]
    (a, ta), (b, tb) = table[i - 1], table[i]
    return ta + (tb - ta) * (rows - a) / (b - a)


def step_time(batch, kv_scale: float = 1.0, host: float = 0.0, bucket: int = 1, gemm=None) -> float:
    """The device's time for `batch`; a step with prefill chunks computes its rows padded to a
    multiple of `bucket` (the piecewise graphs' token counts) and takes at least `host` seconds
    (its host work: scheduling and the launches between the graphs, which overlaps the device's
    previous step but cannot run ahead of it)."""
    run, rest = batch.parts()
    rows, kv, pairs = 0, 0, 0
    if run is not None:
        rows += len(run)
        kv += int(sum(int(s) + 1 for s in run.start))
    for item in rest:
        n = len(item.token_ids)
        rows += n
        ctx = item.start + n
        kv += ctx if n == 1 else item.start  # a prefill chunk's own keys are computed, not read
        pairs += n * item.start + n * (n + 1) // 2
    if rest:
        rows = -(-rows // bucket) * bucket
    t = gemm_seconds(rows, gemm) + kv * KV_TOKEN_S * kv_scale + pairs * PAIR_S + FIXED_S
    return max(t, host) if rest else t


def sample(batch) -> Sampled:
    run, rest = batch.parts()
    head = [100 + int(s) % 7 for s in run.slot] if run is not None else []
    return Sampled((*head, *(100 + item.slot % 7 for item in rest if item.samples)))


def simulate(args, chunk: int, cache: bool, seed: int = 0, protocol: str = "steady") -> dict:
    """protocol "steady": the clients never stop; the requests after the first `warmup` and before
    the last `clients` (which keep the load on while the measured ones finish) are counted, over
    serve_bench's window: from the end of the warm-up's last request (or the first counted send)
    to the last counted send. "barrier": perf/serve_bench.py's phases (until
    2026-11-30): `warmup` requests, a wait for all of them, then `requests` more sent from a
    standing start (every client at once) and drained to the last, all counted."""
    rng = random.Random(seed)
    vocab = range(3, 30000)
    shared = [rng.choice(vocab) for _ in range(args.shared)]
    max_len = args.shared + args.input_len + args.output_max + 8
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=args.max_running,
            max_num_batched_tokens=chunk,
            max_model_len=max_len,
            kv_cache_tokens=args.kv_tokens,
            enable_prefix_cache=cache,
        )
    )
    barrier = protocol == "barrier"
    total = args.warmup + args.requests + (0 if barrier else args.clients)
    now, sent, done, emitted = 0.0, 0, [], []
    arrivals: list[tuple[float, int]] = []  # (time the engine sees it, client)
    live: dict[int, dict] = {}  # slot -> the request's record
    gens = [0] * args.clients

    def send(client: int, at: float) -> None:
        nonlocal sent
        if sent >= total:
            return
        sent += 1
        out = args.output_mean if args.output_std == 0 else int(rng.gauss(args.output_mean, args.output_std))
        out = min(max(out, args.output_min), args.output_max)
        prompt = shared + [rng.choice(vocab) for _ in range(args.input_len)]
        gens[client] += 1
        req = Request(
            slot=client, gen=gens[client], prompt_ids=prompt,
            params=SamplingParams(max_new_tokens=out, temperature=0.0, ignore_eos=True), arrival=sent,
        )  # fmt: skip
        live[client] = {"req": req, "sent": at, "first": None, "n": 0, "index": sent}
        heapq.heappush(arrivals, (at + CLIENT_S, client))

    for c in range(args.clients):
        send(c, 0.0)
    kv_scale = 0.5 if args.fp8_kv else 1.0
    host, bucket = getattr(args, "host_ms", 0.0) / 1e3, getattr(args, "bucket", 1)  # older callers lack them
    gemm = getattr(args, "gemm", None)
    while live:
        while arrivals and arrivals[0][0] <= now:
            _, c = heapq.heappop(arrivals)
            sched.add(live[c]["req"])
        batch = sched.schedule()
        if batch is None:  # idle until the next arrival
            now = arrivals[0][0]
            continue
        now += step_time(batch, kv_scale, host, bucket, gemm)
        applied, finished = sched.update(batch, sample(batch))
        emitted.append((now, len(applied)))
        for slot, _ in applied:
            rec = live[slot]
            rec["n"] += 1
            if rec["first"] is None:
                rec["first"] = now + CLIENT_S
        for fin in finished:
            rec = live.pop(fin.request.slot)
            rec["end"] = now + CLIENT_S
            done.append(rec)
            if not barrier or rec["index"] > args.warmup or sent < args.warmup:
                send(fin.request.slot, rec["end"])
            elif not live:  # the warm-up phase's last one: the measured phase, every client at once
                for c in range(args.clients):
                    send(c, rec["end"])
    measured = [r for r in done if args.warmup < r["index"] <= args.warmup + args.requests]
    if not barrier:  # serve_bench's window: from the warm-up's drain (or the first counted send)
        warm_ends = [r["end"] for r in done if r["index"] <= args.warmup]
        start = max([min(r["sent"] for r in measured), *warm_ends])
        end = max(r["sent"] for r in measured)
        measured = [r for r in measured if start <= r["sent"] <= end]
    ttft = sorted(1e3 * (r["first"] - r["sent"]) for r in measured)
    tpot = sorted(1e3 * (r["end"] - r["first"]) / max(r["n"] - 1, 1) for r in measured)
    if barrier:  # as the bench reports: the phase's requests over its whole time
        start, end = min(r["sent"] for r in measured), max(r["end"] for r in measured)
        finished, out_tokens = len(measured), sum(r["n"] for r in measured)
    else:  # what ran in that window, every client busy throughout
        finished = sum(start <= r["end"] <= end for r in done)
        out_tokens = sum(n for t, n in emitted if start <= t <= end)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "chunk": chunk,
        "cache": cache,
        "qps": finished / (end - start),
        "out_tps": out_tokens / (end - start),
        "ttft_p50": statistics.median(ttft),
        "ttft_p90": pct(ttft, 0.9),
        "ttft_mean": statistics.fmean(ttft),
        "tpot_p50": statistics.median(tpot),
        "tpot_p99": pct(tpot, 0.99),
    }


def dp_rows(args, protocol: str, chunks: list[int]) -> None:
    """--dp N: per chunk, one replica under all the clients and N replicas sharing them (each under
    clients / N, throughput x N), the ratio against one GPU at the first chunk listed."""
    share = copy.copy(args)
    share.clients = args.clients // args.dp
    share.warmup = share.clients
    against = "x one GPU @" + str(chunks[0])
    print(f"{'chunk':>6} {'one GPU tok/s':>14} {f'DP={args.dp} tok/s':>12} {against:>16}"
          f" {'DP TTFT p50':>12} {'TPOT p50':>9}")  # fmt: skip
    base = None
    for chunk in chunks:
        one = simulate(args, chunk, True, protocol=protocol)
        dp = simulate(share, chunk, True, protocol=protocol)
        base = base or one["out_tps"]
        print(
            f"{chunk:>6} {one['out_tps']:>14.0f} {args.dp * dp['out_tps']:>12.0f}"
            f" {args.dp * dp['out_tps'] / base:>15.2f}x {dp['ttft_p50']:>12.1f} {dp['tpot_p50']:>9.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", choices=["prefix", "1024in"], default="prefix")
    ap.add_argument("--chunks", default="256,512,1024,2048,4096")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=500, help="counted (after --clients warm-up ones)")
    ap.add_argument("--protocol", choices=["steady", "barrier", "both"], default="steady")
    ap.add_argument("--max-running", type=int, default=128)
    ap.add_argument("--kv-tokens", type=int, default=500_000)
    ap.add_argument("--fp8-kv", action="store_true", help="a float8 KV cache: half the KV bytes a step reads")
    ap.add_argument("--host-ms", type=float, default=0.0, help="least ms of a step with prefill chunks")
    ap.add_argument("--bucket", type=int, default=1, help="pad a prefill step's rows to a multiple of this")
    ap.add_argument("--dp", type=int, default=0, help="N replicas sharing the clients, against one GPU")
    ap.add_argument("--gemm-table", help="perf/gemm_rows_bench.py's output: measured projection times")
    args = ap.parse_args()
    args.gemm = read_gemm_table(args.gemm_table) if args.gemm_table else None
    if args.workload == "prefix":  # issue 10 must-show 4: 2,000 shared + 100 own tokens, 128 out
        args.shared, args.input_len, args.output_mean, args.output_std = 2000, 100, 128, 0
        args.output_min, args.output_max = 128, 128
    else:  # issue 10 must-show 1: 1024 in, N(128, 128) out clipped to [2, 256]
        args.shared, args.input_len, args.output_mean, args.output_std = 0, 1024, 128, 128
        args.output_min, args.output_max = 2, 256
    args.warmup = args.clients
    print(
        f"{args.workload}: {args.clients} clients, {args.requests} requests counted after {args.warmup};"
        f" simulated H200 steps (see the docstring)"
    )
    protocols = ("steady", "barrier") if args.protocol == "both" else (args.protocol,)
    if args.dp:
        return dp_rows(args, protocols[0], [int(c) for c in args.chunks.split(",")])
    print(
        f"{'protocol':>8} {'chunk':>6} {'cache':>6} {'QPS':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p90':>7}"
        f" {'mean':>7} {'TPOT p50':>9} {'p99':>7}"
    )
    caches = (True, False) if args.workload == "prefix" else (True,)
    for protocol, chunk, cache in itertools.product(protocols, map(int, args.chunks.split(",")), caches):
        r = simulate(args, chunk, cache, protocol=protocol)
        print(
            f"{protocol:>8} {chunk:>6} {'on' if cache else 'off':>6} {r['qps']:7.1f} {r['out_tps']:10.0f}"
            f" {r['ttft_p50']:9.1f} {r['ttft_p90']:7.1f} {r['ttft_mean']:7.1f}"
            f" {r['tpot_p50']:9.2f} {r['tpot_p99']:7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
