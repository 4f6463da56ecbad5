"""The decode step's projections at a few rows: `skinny_linear` against cuBLAS (`F.linear`), in the
same run, each replayed from a CUDA graph (as the decode step runs them), L2 flushed between calls.

Prints, per shape (N, K) and rows M: microseconds of cuBLAS, of the kernel with the tiles it picks
(`skinny_config`), and of the best of a small sweep of tiles, with the weight bytes over the
copy rate measured in the same run as the roof.

    python perf/skinny_linear_bench.py [--rows 1,4,8] [--sweep]
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F
from kernel_bench import bench_ms, copy_gbps  # perf/ on the path when run from there; src/ too

from lightllm_async.kernels.testing import rel_err

S = importlib.import_module("lightllm_async.kernels.skinny_linear")

SHAPES = [  # (label, N, K)
    ("l3 qkv", 6144, 4096), ("l3 o", 4096, 4096), ("l3 gate_up", 28672, 4096), ("l3 down", 4096, 14336),
    ("l3 tp2 qkv", 3072, 4096), ("l3 tp2 o", 4096, 2048), ("l3 tp2 gate_up", 14336, 4096),
    ("l3 tp2 down", 4096, 7168),
    ("v2l q|kv_a", 3648, 2048), ("v2l o", 2048, 2048), ("v2l router", 64, 2048),
    ("v2l dense gate_up", 21888, 2048), ("v2l dense down", 2048, 10944),
]  # fmt: skip
SWEEP = [
    S.SkinnyConfig(bn, bk, w, st)
    for bn, bk in ((16, 256), (16, 512), (32, 256), (32, 512), (64, 128), (64, 256))
    for w, st in ((4, 3), (4, 5), (8, 4))
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP tiles, print the best")
    args = ap.parse_args()
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s", flush=True)
    table = []
    for label, n, k in SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
        roof = n * k * 2 / copy / 1e3  # µs
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            out_dtype = torch.float32 if "router" in label else None
            ref = S.skinny_linear_ref(x, w, None, out_dtype)
            assert rel_err(S.skinny_linear(x, w, None, out_dtype), ref) < 1e-2
            if out_dtype is None:
                cublas = bench_ms(lambda x=x, w=w: F.linear(x, w), True) * 1e3
            else:
                cublas = bench_ms(lambda x=x, w=w: torch.mm(x, w.t(), out_dtype=torch.float32), True) * 1e3
            ours = bench_ms(lambda x=x, w=w, o=out_dtype: S.skinny_linear(x, w, None, o), True) * 1e3
            best, best_cfg = ours, S.skinny_config(n, k, x.device)
            for cfg in SWEEP if args.sweep else ():
                try:
                    us = (
                        bench_ms(lambda x=x, w=w, o=out_dtype, c=cfg: S.skinny_linear(x, w, None, o, c), True)
                        * 1e3
                    )
                except Exception as e:  # noqa: BLE001  (a tile the card cannot compile)
                    print(f"    {cfg}: {type(e).__name__}", flush=True)
                    continue
                if us < best:
                    best, best_cfg = us, cfg
            table.append((label, n, k, m, roof, cublas, ours, best, best_cfg))
            print(
                f"  {label} M={m}: cuBLAS {cublas:.1f} ours {ours:.1f} best {best:.1f} {best_cfg}", flush=True
            )
        del w
    print("\nmicroseconds per call (CUDA graph replay); roof = weight bytes / copy rate:")
    print(
        f"{'shape':<18}{'N':>6}{'K':>6}{'M':>3}{'roof':>7}{'cuBLAS':>8}{'skinny':>8}{'best':>7}"
        "  best tiles (n, k, warps, stages)"
    )
    for label, n, k, m, roof, cublas, ours, best, cfg in table:
        tiles = f"{cfg.block_n}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages}"
        print(f"{label:<18}{n:>6}{k:>6}{m:>3}{roof:>7.1f}{cublas:>8.1f}{ours:>8.1f}{best:>7.1f}  {tiles}")


if __name__ == "__main__":
    main()
