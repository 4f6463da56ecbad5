"""The projections of a Llama-3-8B step (q|k|v, o, gate|up, down: cuBLAS through torch.matmul, bf16)
timed against the step's row count M, every --step rows, beside the time the same FLOPs take at the
bf16 8192^3 matmul rate measured in the same run. A mixed step of M rows (prefill tokens plus
decodes) is padded to a CUDA-graph bucket (runner/piecewise.py: every 128 rows up to 2048); this
shows what a row count costs on the card, between buckets too. The scheduler simulation takes the
printed table as its GEMM cost (perf/prefix_sim.py --gemm-table).

    python perf/gemm_rows_bench.py [--rows 256:1152] [--step 32]

Each GEMM is timed from a CUDA graph of 8 calls over distinct weights (a step's layers), L2 flushed
before each replay; the table's step column is 32 layers of the four.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from decode_bench import matmul_rate  # noqa: E402
from kernel_bench import bench_ms  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS, CHAIN = 32, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="256:1152", help="first:last row count")
    ap.add_argument("--step", type=int, default=32)
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.rows.split(":"))
    dev, dt = "cuda", torch.bfloat16
    rate = matmul_rate(dev) / 1e12  # TFLOP/s
    weights = {k: [torch.randn(*nk, dtype=dt, device=dev) for _ in range(CHAIN)] for k, nk in SHAPES.items()}
    x = torch.randn(hi, 14336, dtype=dt, device=dev)
    print(f"{torch.cuda.get_device_name()}  bf16 matmul 8192^3: {rate:.0f} TFLOP/s", flush=True)
    header = " ".join(f"{k + ' us':>11}" for k in SHAPES)
    print(f"{'M':>5} {header}   step ms  at the rate  ratio", flush=True)
    for m in range(lo, hi + 1, args.step):
        us = {}
        for k, (_, kk) in SHAPES.items():
            xs = x[:m, :kk]
            ws = weights[k]
            us[k] = 1e3 * bench_ms(lambda xs=xs, ws=ws: [xs @ w.T for w in ws], graph=True) / CHAIN
        step = LAYERS * sum(us.values()) / 1e3
        ideal = LAYERS * sum(2 * m * n * kk for n, kk in SHAPES.values()) / rate / 1e9
        cols = " ".join(f"{us[k]:11.1f}" for k in SHAPES)
        print(f"{m:5d} {cols}   {step:7.2f}  {ideal:11.2f}  {step / ideal:5.2f}", flush=True)


if __name__ == "__main__":
    main()
