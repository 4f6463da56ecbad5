"""Prefill attention at 4k causal against the card's bf16 matmul rate and SDPA, one process (issue 10).

    python perf/prefill_attention_bench.py [--sweep]

Llama-3-8B heads (32 q / 8 kv, dim 128), bf16, one request of 4096 new tokens (four of 1024
after a 3072-token prefix; sixteen of 100 after a 2000-token cached prefix, a shared system
prompt's hits). TFLOP/s counts the causal pairs only (4 * pairs * H * D). The matmul
rate is an 8192^3 bf16 torch.mm in the same run; SDPA is torch's scaled_dot_product_attention
(causal, flash backend where available) on contiguous [1, H, T, D] tensors, GQA heads expanded,
so it reads no request table. "new k/v contiguous": the new tokens' k/v read from the step's own
[T, Hk, D] tensors rather than gathered from the cache (the model passes them). `--sweep`: also
every (BLOCK_M, BLOCK_N, warps, stages, grid order, prefix block) below, to choose from.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import bench_ms, prefill_case, rand  # noqa: E402

from lightllm_async import kernels as K  # noqa: E402
from lightllm_async.kernels.prefill_attention import _blocks as chosen_blocks  # noqa: E402


def matmul_tflops(n: int = 8192) -> float:
    a, b = rand(n, n), rand(n, n)
    return 2 * n**3 / bench_ms(lambda: a @ b) / 1e9


def sdpa_ms(t: int, hq: int, dim: int) -> float:
    q, k, v = (rand(1, hq, t, dim) for _ in range(3))
    return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--blocks",
        default="",
        help="also these (BLOCK_M,BLOCK_N,warps,stages,order,prefix block) tuples, ';'-separated",
    )
    args = ap.parse_args()
    extra = [tuple(int(v) for v in b.split(",")) for b in args.blocks.split(";") if b]
    torch.manual_seed(0)
    mm = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul {mm:.0f} TFLOP/s")
    rows = Rows(mm)
    for batch, new, prefix in ((1, 4096, 0), (4, 1024, 3072), (16, 100, 2000)):
        case = prefill_case(batch, new, prefix, 32, 8, 128)
        ms = bench_ms(case.kernel)
        rows.append((case.shape, "kernel (chosen blocks)", ms, case.flops / ms / 1e9))
        q, kc, vc = case.args[:3]
        new_kv = {
            "k_new": rand(q.shape[0], kc.shape[1], kc.shape[2]),
            "v_new": rand(q.shape[0], *vc.shape[1:]),
        }
        ms = bench_ms(functools.partial(K.prefill_attention, *case.args, **new_kv))
        rows.append((case.shape, "kernel, new k/v contiguous", ms, case.flops / ms / 1e9))
        if batch == 1:
            s = sdpa_ms(new, 32, 128)
            rows.append((case.shape, "SDPA (dense, causal)", s, case.flops / s / 1e9))
        chosen = chosen_blocks(q, batch, True)
        for order in (0, 1, 2):  # the grid's order (prefill_attention's ORDER) at the chosen blocks
            blocks = (*chosen[:4], order, *chosen[5:])
            ms = bench_ms(functools.partial(K.prefill_attention, *case.args, blocks=blocks, **new_kv))
            rows.append((case.shape, f"new k/v, grid order {order}", ms, case.flops / ms / 1e9))
        tma = (
            (*chosen[:6], False),
            (*chosen[:6], True),
            (128, 64, 8, 3, 2, 128, True),
            (128, 128, 8, 3, 2, 128, True),
        )
        for blocks in dict.fromkeys(tma):  # with and without the new keys through TMA (chosen on Hopper)
            ms = bench_ms(functools.partial(K.prefill_attention, *case.args, blocks=blocks, **new_kv))
            name = "new k/v, {}, {}x{} w{} s{}".format("TMA" if blocks[6] else "no TMA", *blocks)
            rows.append((case.shape, name, ms, case.flops / ms / 1e9))
        sweep = itertools.product((64, 128), (32, 64, 128), (4, 8), (3, 4), (0, 2), (64, 128))
        for blocks in [*extra, *(sweep if args.sweep else ())]:
            if blocks not in extra and (blocks[0] % blocks[1] or (prefix == 0 and blocks[5] != 128)):
                continue  # the new tokens are read in whole key blocks; no prefix: no prefix block
            try:
                ms = bench_ms(functools.partial(K.prefill_attention, *case.args, blocks=blocks, **new_kv))
            except Exception as exc:  # out of shared memory for that tile: not a candidate
                print(f"  {blocks}: {type(exc).__name__}")
                continue
            name = "  new k/v, {}x{} w{} s{} order {} prefix {}".format(*blocks)
            rows.append((case.shape, name, ms, case.flops / ms / 1e9))
        torch.cuda.empty_cache()
    # The card's matmul rate moved 707-783 TFLOP/s between calls on 2026-11-30 while the kernels'
    # times did not: measured again after the rows, the table divides by the higher of the two.
    after = matmul_tflops()
    mm = max(mm, after)
    print(f"bf16 matmul after the rows {after:.0f} TFLOP/s; the table's ratios are of {mm:.0f}")
    print(f"\n{'shape':<36} {'variant':<34} {'ms':>8} {'TFLOP/s':>8} {'of mm':>6}")
    for shape, name, ms, tf in rows:
        print(f"{shape:<36} {name:<34} {ms:8.3f} {tf:8.0f} {tf / mm:6.0%}")


class Rows(list):
    """The table's rows, each also printed as it is measured (a run cut short keeps what it had)."""

    def __init__(self, mm: float):
        super().__init__()
        self.mm = mm

    def append(self, row) -> None:
        super().append(row)
        shape, name, ms, tf = row
        print(f"  . {shape:<36} {name:<34} {ms:8.3f} {tf:8.0f} {tf / self.mm:6.0%}", flush=True)


if __name__ == "__main__":
    main()
