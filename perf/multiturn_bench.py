"""Multi-turn chat against a running server (issue 10: the prefix cache's hit rate when each turn
resends the conversation). C clients each hold one conversation of T turns over
/v1/chat/completions (streamed, with usage): turn k sends the system prompt, every earlier user
message and assistant reply, and a new user message of U random words; the reply is capped at O
tokens and becomes part of the next turn. Per turn: mean prompt tokens, mean cached tokens
(`usage.prompt_tokens_details.cached_tokens`), the hit rate, TTFT p50; at the end the server's own
counters (`/metrics`: prefix-cache hits over queried tokens).

    python perf/multiturn_bench.py --url http://127.0.0.1:8000 [--clients 4 --turns 5 --user-words 40
        --max-tokens 32 --system-words 150 --seed 0]

The assistant's text is sent back as text, so the chat template re-tokenizes it: a reply whose
tokens do not round-trip costs a few positions of hit, as it does for a real client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import threading
import time
from urllib.parse import urlsplit

WORDS = [
    "the", "model", "token", "stream", "cache", "expert", "router", "latent", "query", "brown",
    "fox", "river", "mountain", "garden", "engine", "signal", "memory", "window", "planet",
    "harbor", "lantern", "violin", "copper", "meadow", "thunder", "pencil", "ocean", "castle",
]  # fmt: skip


def chat(url: str, messages: list[dict], max_tokens: int) -> tuple[str, float, dict]:
    """One streamed turn: (reply text, seconds to the first content, usage)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    text, ttft, usage = [], None, {}
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", ()):
            piece = choice.get("delta", {}).get("content")
            if piece:
                ttft = time.perf_counter() - start if ttft is None else ttft
                text.append(piece)
    conn.close()
    return "".join(text), ttft if ttft is not None else time.perf_counter() - start, usage


def conversation(args, k: int, rows: list[list[tuple[int, int, float]]]) -> None:
    rng = random.Random(args.seed * 1000 + k)
    system = " ".join(rng.choices(WORDS, k=args.system_words))
    messages = [{"role": "system", "content": f"You are assistant {k % 3}. {system}"}]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=args.user_words))})
        reply, ttft, usage = chat(args.url, messages, args.max_tokens)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        rows[turn].append((usage.get("prompt_tokens", 0), cached, ttft))
        messages.append({"role": "assistant", "content": reply})


def metrics(url: str) -> dict[str, float]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    out = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    conn.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--user-words", type=int, default=40)
    p.add_argument("--system-words", type=int, default=150)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    before = metrics(args.url)
    rows: list[list[tuple[int, int, float]]] = [[] for _ in range(args.turns)]
    threads = [threading.Thread(target=conversation, args=(args, k, rows)) for k in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = metrics(args.url)
    print(f"{args.clients} conversations x {args.turns} turns in {wall:.1f} s")
    print(f"{'turn':<6}{'prompt tok':>11}{'cached tok':>11}{'hit %':>7}{'TTFT p50 ms':>12}")
    total_prompt = total_cached = 0
    for turn, r in enumerate(rows):
        if not r:
            continue
        prompt, cached = sum(x[0] for x in r), sum(x[1] for x in r)
        total_prompt, total_cached = total_prompt + prompt, total_cached + cached
        print(
            f"{turn + 1:<6}{prompt / len(r):>11.0f}{cached / len(r):>11.0f}"
            f"{100 * cached / max(prompt, 1):>7.1f}"
            f"{1e3 * statistics.median(x[2] for x in r):>12.0f}"
        )
    print(f"all turns: {100 * total_cached / max(total_prompt, 1):.1f}% of prompt tokens cached")
    hits = "lightllm_async:prefix_cache_hits_total"
    queried = "lightllm_async:prefix_cache_queries_total"
    if hits in after and queried in after:
        dh, dq = after[hits] - before.get(hits, 0), after[queried] - before.get(queried, 0)
        print(f"/metrics: {dh:.0f} of {dq:.0f} queried prompt tokens hit ({100 * dh / max(dq, 1):.1f}%)")


if __name__ == "__main__":
    main()
