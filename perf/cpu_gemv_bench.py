"""The int4 / int8 products for a few rows (kernels/cpu_gemv.py, csrc/gemv.c) against torch's CPU
kernels at SmolLM2-135M's shapes: `_weight_int4pack_mm_for_cpu` (bfloat16 scale and zero, as
Int4Linear used it), `_weight_int8pack_mm` (the head, a scale per row) and bfloat16 `F.linear`.

Each cell is the median over --rounds of the mean µs of a call, the methods alternating within a
round; GB/s counts each method's own weight bytes (int4: codes and two 16-bit numbers per group of
32; int8: codes and a scale per row; bf16: 2 bytes a weight). With --copies N each call takes the
next of N copies of the weights, so that they come from L3/DRAM as in a whole decode step rather
than from L2 (SmolLM2's packed weights are ~88 MB a token).

    OMP_NUM_THREADS=1 PYTHONPATH=src python perf/cpu_gemv_bench.py [--rows 1 2 4 8] [--copies 1] [--level 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightllm_async.kernels import cpu_gemv

# (name, in, out); SmolLM2-135M's q|k|v is 576 -> 960 (9 query heads, 3 KV heads of 64)
SHAPES = [
    ("qkv 576->960", 576, 960),
    ("qkv-ish 576->1728", 576, 1728),
    ("o 576->576", 576, 576),
    ("gate_up 576->3072", 576, 3072),
    ("down 1536->576", 1536, 576),
    ("head 576->49152", 576, 49152),
]


def torch_int4(x, w):
    return torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])


def int4_methods(k: int, n: int, copies: int) -> dict:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, mn = torch.rand(n, k // 32) * 0.01, -torch.rand(n, k // 32) * 0.08
    int4_bytes = n * k // 2 + n * k // 32 * 4
    ours = [cpu_gemv.pack_int4(codes, scale, mn) for _ in range(copies)]
    sz = torch.stack([scale, mn + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    theirs = [(packed.clone(), sz.clone()) for _ in range(copies)]
    w16 = [torch.randn(n, k).bfloat16() for _ in range(copies)]
    return {
        "ours int4": (int4_bytes, ours, lambda x, w: cpu_gemv.int4_mm(x, w[0], w[1], n)),
        "torch int4pack": (int4_bytes, theirs, torch_int4),
        "bf16 F.linear": (n * k * 2, w16, F.linear),
    }  # fmt: skip


def int8_methods(k: int, n: int, copies: int) -> dict:
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) * 0.01).bfloat16()
    int8_bytes = n * k + n * 4
    ours = [cpu_gemv.pack_int8(codes, scale) for _ in range(copies)]
    theirs = [(codes.clone(), scale.clone()) for _ in range(copies)]
    w16 = [torch.randn(n, k).bfloat16() for _ in range(copies)]
    return {
        "ours int8": (int8_bytes, ours, lambda x, w: cpu_gemv.int8_mm(x, w[0], w[1], n)),
        "torch int8pack": (int8_bytes, theirs, lambda x, w: torch._weight_int8pack_mm(x, *w)),
        "bf16 F.linear": (n * k * 2, w16, F.linear),
    }  # fmt: skip


def time_us(fn, x, weights, calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)])
    return (time.perf_counter() - t0) * 1e6 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", help="names' prefixes to keep (qkv, o, gate_up, down, head)")
    ap.add_argument("--level", type=int, default=3, help="at most: 3 AVX-512 VNNI, 2 AVX2, 0 plain C")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu_gemv.native.set_level(args.level)
    print(f"_gemv level {cpu_gemv.native.level()} (3 AVX-512 VNNI, 2 AVX2, 0 C); {args.copies} copies")
    print("| shape | M | method | µs | GB/s | × torch's quantized |")
    print("|---|---|---|---|---|---|")
    for name, k, n in SHAPES:
        if args.shapes and not any(name.startswith(s) for s in args.shapes):
            continue
        head = name.startswith("head")
        copies = max(1, min(args.copies, 4 if head else args.copies))
        methods = (int8_methods if head else int4_methods)(k, n, copies)
        for m in args.rows:
            x = torch.randn(m, k).bfloat16()
            calls = max(3, int(3e5 / (n * k / 1000)))  # ~0.1-0.3 s a method
            times: dict[str, list[float]] = {key: [] for key in methods}
            for _, w, fn in methods.values():
                time_us(fn, x, w, 3)
            for _ in range(args.rounds):
                for key, (_, w, fn) in methods.items():
                    times[key].append(time_us(fn, x, w, calls))
            med = {key: statistics.median(v) for key, v in times.items()}
            base = med["torch int8pack" if head else "torch int4pack"]
            for key, (nbytes, _, _) in methods.items():
                print(
                    f"| {name} | {m} | {key} | {med[key]:.1f} | {nbytes / med[key] / 1e3:.1f} | "
                    f"{base / med[key]:.2f} |"
                )


if __name__ == "__main__":
    main()
