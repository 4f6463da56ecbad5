"""The default model served on the CPU while other work shares the machine (issue 12): streaming
decode time of one request, then of 4 concurrent ones, alone and with a busy-loop process keeping
one core busy, for each engine thread setting given.

    python perf/cpu_contention_bench.py [--tokens 32] [--variants default,2:PASSIVE,2:ACTIVE]

A variant is `default` (the server's own policy: the cores left after the frontend, idle threads
sleeping) or `THREADS:OMP_WAIT_POLICY`. Each variant starts its own server (`--cpu-threads`,
the environment's OMP_WAIT_POLICY), warms it up, then times: 1 stream alone, 1 stream with the
busy core, 4 streams with the busy core. Prints a table; standard library only on the client side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BUSY = "while True: pass"


def start_server(port: int, threads: int | None, policy: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    else:
        env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, "-m", "lightllm_async.server", "--device", "cpu", "--port", str(port)]
    cmd += ["--max-model-len", "1024", "--kv-cache-tokens", "4096"]
    if threads:
        cmd += ["--cpu-threads", str(threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "lightllm-async ready" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
    raise RuntimeError(f"server exited {proc.wait()}")


def stream(port: int, tokens: int) -> float:
    body = json.dumps(
        {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - start


def concurrent(port: int, tokens: int, n: int) -> float:
    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(port, tokens)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def measure(variant: str, port: int, tokens: int) -> dict:
    threads, policy = (None, None) if variant == "default" else variant.split(":")
    proc = start_server(port, int(threads) if threads else None, policy)
    try:
        stream(port, 8)  # warm-up
        alone = min(stream(port, tokens) for _ in range(2))
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(0.5)
            contended = stream(port, tokens)
            four = concurrent(port, tokens, 4)
        finally:
            busy.kill()
            busy.wait()
    finally:
        proc.terminate()
        proc.wait(30)
    return {"variant": variant, "alone_s": alone, "busy_s": contended, "four_busy_s": four}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--variants", default="default,2:PASSIVE,2:ACTIVE")
    ap.add_argument("--port", type=int, default=8411)
    args = ap.parse_args()
    rows = [measure(v, args.port, args.tokens) for v in args.variants.split(",")]
    n, cores = args.tokens, len(os.sched_getaffinity(0))
    print(
        f"\nSmolLM2-135M (embedded GGUF), {cores} cores, {n} tokens per stream, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'engine threads:policy':<24}{'alone s':>9}{'tok/s':>8}{'1 core busy s':>15}{'tok/s':>8}"
          f"{'share':>7}{'4 streams, busy s':>19}")  # fmt: skip
    for r in rows:
        print(
            f"{r['variant']:<24}{r['alone_s']:>9.2f}{n / r['alone_s']:>8.1f}{r['busy_s']:>15.2f}"
            f"{n / r['busy_s']:>8.1f}{r['alone_s'] / r['busy_s']:>7.0%}{r['four_busy_s']:>19.2f}"
        )


if __name__ == "__main__":
    main()
