"""Throughput against TPOT for serving runs at different prefill chunk sizes (issue 10).

    python perf/plot_chunks.py --out chunks.png CHUNK=serve.json [CHUNK=serve.json ...]

Each `serve_bench.py` result (its summary is enough) is one chunk size (`--max-num-batched-tokens`):
a point per TPOT percentile (p50, p90, p99) at that run's input + output tokens/s, joined per
percentile across chunk sizes. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="CHUNK=path.json")
    ap.add_argument("--out", default="chunks.png")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    points = []
    for run in args.runs:
        chunk, path = run.split("=", 1)
        with open(path) as f:
            s = json.load(f)["summary"]
        points.append((int(chunk), s["input_tokens_per_s"] + s["output_tokens_per_s"], s["tpot_ms"]))
    points.sort()
    fig, ax = plt.subplots(figsize=(6, 4))
    for pct, marker in (("p50", "o"), ("p90", "s"), ("p99", "^")):
        xs = [p[2][pct] for p in points]
        ys = [p[1] / 1e3 for p in points]
        ax.plot(xs, ys, marker=marker, label=f"TPOT {pct}")
        for (chunk, _, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(str(chunk), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(100, color="grey", linestyle=":", label="TPOT p99 goal (100 ms)")
    ax.set_xlabel("TPOT (ms)")
    ax.set_ylabel("input + output tokens/s (thousands)")
    ax.set_title(args.title or "throughput against TPOT, by prefill chunk (tokens)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for chunk, tps, tpot in points:
        pcts = " / ".join(f"{tpot[p]:.1f}" for p in ("p50", "p90", "p99"))
        print(f"chunk {chunk:6d}: {tps:8.0f} tok/s, TPOT p50/p90/p99 {pcts} ms")


if __name__ == "__main__":
    main()
