"""One decode row times a weight (y = x W^T, M = 1) on the GPU: cuBLAS through F.linear (what the
layers call) against the same product asked as a matrix-vector one (torch.mv(W, x): cuBLAS's gemv
path), at Llama-3-8B's projection shapes whole and per rank at TP=2, and the LM head's.

    device run: python3 perf/gemv_bench.py

Each variant runs 64 calls in a CUDA graph, cycling through enough copies of the weight to exceed
the L2 cache (so every call streams its weight from HBM, as in a decode step), median of 7 replays.
Prints microseconds per call and the share of the copy rate measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from decode_bench import copy_bandwidth
from graph_timing import replay_us

SHAPES = [  # name, N (outputs), K (inputs)
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("tp2 qkv", 3072, 4096),
    ("tp2 o", 4096, 2048),
    ("tp2 gate_up", 14336, 4096),
    ("tp2 down", 4096, 7168),
    ("head", 128256, 4096),
    ("tp2 head", 64128, 4096),
]
CALLS = 64


def time_calls(fn, weights, x) -> float:
    for w in weights[:2]:
        fn(w, x)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)], x)
    return replay_us(graph, CALLS, 7)


VARIANTS = {
    "F.linear": lambda w, x: F.linear(x, w),
    "torch.mv": lambda w, x: torch.mv(w, x[0]),
}


def main() -> None:
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s; us per call (share of the copy rate)")
    print(f"{'shape':12} {'N':>6} {'K':>6} {'roof':>6}" + "".join(f"{v:>18}" for v in VARIANTS))
    for name, n, k in SHAPES:
        nbytes = n * k * 2
        copies = max(2, -(-(160 << 20) // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, weights[0]).float()
        roof = nbytes / bw * 1e6
        cells = []
        for label, fn in VARIANTS.items():
            got = fn(weights[0], x).float().reshape(ref.shape)
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{label} {name}: rel err {err}"
            us = time_calls(fn, weights, x)
            cells.append(f"{us:9.1f} ({roof / us:4.0%})")
        print(f"{name:12} {n:6d} {k:6d} {roof:6.1f}" + "".join(f"{c:>18}" for c in cells))
        del weights


if __name__ == "__main__":
    main()
