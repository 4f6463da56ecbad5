"""Plot the latency distributions of one or more `serve_bench.py` results: CDFs of TTFT, TPOT, E2E.

    python perf/plot_serve.py results.json [other.json ...] [--out latency.png]

Several files are drawn on the same axes, labelled by file name, to compare runs. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (record field, axis title, scale to the unit shown)
METRICS = (("ttft", "TTFT (ms)", 1e3), ("tpot", "TPOT (ms)", 1e3), ("e2e", "end-to-end latency (s)", 1.0))


def load(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    return data["summary"], [r for r in data["records"] if r["error"] is None]


def plot_cdf(ax: plt.Axes, values: np.ndarray, label: str) -> None:
    xs = np.sort(values)
    ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    for p in (50, 90, 99):
        ax.axvline(np.percentile(xs, p), ls=":", lw=0.8, color=ax.lines[-1].get_color())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by serve_bench.py --out")
    p.add_argument("--out", default=None, help="PNG to write (default: the first file's name .png)")
    args = p.parse_args()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for path in args.results:
        summary, records = load(path)
        label = (
            f"{os.path.basename(path)} ({summary['qps']:.2f} QPS, {summary['output_tokens_per_s']:.0f} tok/s)"
        )
        for ax, (name, _, scale) in zip(axes, METRICS, strict=True):
            values = np.array([r[name] for r in records if r[name] is not None]) * scale
            if len(values):
                plot_cdf(ax, values, label)
    for ax, (_, title, _) in zip(axes, METRICS, strict=True):
        ax.set(xlabel=title, ylabel="fraction of requests", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("latency CDFs (dotted: p50, p90, p99)")
    fig.tight_layout()
    out = args.out or os.path.splitext(args.results[0])[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
