"""Decode attention (Llama-3-8B heads: 32 q / 8 kv, dim 128, bf16) at the batches the server steps
through, against the number of chunks each context is cut into: the heuristic's choice beside
every count in --splits, each timed as --chain L calls over distinct caches back to back in one
CUDA graph (as a decode step runs its layers), L2 flushed before each replay.

Contexts are drawn uniformly from [ctx (1 - spread), ctx (1 + spread)] per request (a served batch
is never of one length), so that the programs of the last wave end at different times as they do
in the server. GB/s counts the cache rows read, the token table, q and out; '% copy' is that over
a device-to-device copy measured in the same run.

    python perf/decode_splits_bench.py --shapes 50x1100,100x1100,256x640 --splits 1,2,3,4,6,8 [--fp8]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import bench_ms, copy_gbps  # noqa: E402  (also puts src/ on the path)

D = importlib.import_module("lightllm_async.kernels.decode_attention")
HQ, HK, DIM = 32, 8, 128


def layer(batch: int, ctx: int, spread: float, seed: int, cache_dtype: torch.dtype) -> tuple[tuple, int]:
    """One layer's decode inputs, each request's rows scattered over the cache; (args, bytes read)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lo, hi = max(1, int(ctx * (1 - spread))), max(1, int(ctx * (1 + spread)))
    lens = torch.randint(lo, hi + 1, (batch,), device="cuda", generator=g, dtype=torch.int32)
    rows = int(lens.sum())
    perm = torch.randperm(rows, device="cuda", generator=g).int()
    r2t = torch.nn.utils.rnn.pad_sequence(perm.split(lens.tolist()), batch_first=True)  # [B, max len]
    kc = torch.randn(rows, HK, DIM, device="cuda", generator=g).to(cache_dtype)
    vc = torch.randn(rows, HK, DIM, device="cuda", generator=g).to(cache_dtype)
    q = torch.randn(batch, HQ, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    req_idx = torch.arange(batch, device="cuda", dtype=torch.int32)
    nbytes = kc.nbytes + vc.nbytes + rows * 4 + 2 * q.nbytes
    return (q, kc, vc, r2t, req_idx, lens, DIM**-0.5), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="50x1100,100x1100,256x640,50x270,100x270", help="batch x context")
    ap.add_argument("--splits", default="1,2,3,4,6,8")
    ap.add_argument("--chain", type=int, default=4, help="calls over distinct caches a replay")
    ap.add_argument("--spread", type=float, default=0.2, help="context drawn from ctx * (1 -/+ spread)")
    ap.add_argument("--fp8", action="store_true", help="a float8 (e4m3) cache, as --kv-cache-dtype fp8")
    args = ap.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    copy = copy_gbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    name = torch.cuda.get_device_name()
    print(f"{name}  {sms} SMs  copy {copy:.0f} GB/s  chain {args.chain}  cache {cache_dtype}", flush=True)
    table = []
    for shape in args.shapes.split(","):
        batch, ctx = (int(v) for v in shape.split("x"))
        layers = [layer(batch, ctx, args.spread, seed, cache_dtype) for seed in range(args.chain)]
        nbytes = sum(n for _, n in layers) / len(layers)
        q, kc, vc, *rest = layers[0][0]
        ref = D.decode_attention_ref(q, kc.float(), vc.float(), *rest)  # the same (float8) values
        chosen = D._num_splits(batch, HK, torch.device("cuda"))
        row = {"shape": shape, "chosen": chosen, "roof": nbytes / copy / 1e3}
        for splits in [0] + [int(s) for s in args.splits.split(",")]:  # 0: the heuristic's
            out = D.decode_attention(*layers[0][0], num_splits=splits or None)
            err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            assert err < 1e-2, f"{shape} splits={splits}: error {err}"

            def run(splits=splits, layers=layers):
                for a, _ in layers:
                    D.decode_attention(*a, num_splits=splits or None)

            row[splits] = bench_ms(run, graph=True) * 1e3 / len(layers)
            print(f"  {shape} splits={splits or f'auto({chosen})'}: {row[splits]:.1f} us", flush=True)
        table.append(row)
        del layers
        torch.cuda.empty_cache()
    cols = [int(s) for s in args.splits.split(",")]
    print(f"\nµs a call (chained x{args.chain}); %: bytes at the copy rate over the time")
    print(f"{'B x ctx':<10}{'roof':>7}{'auto':>16}" + "".join(f"{f'{c} splits':>13}" for c in cols))
    for r in table:
        cells = [f"{r[c]:6.1f} {100 * r['roof'] / r[c]:3.0f}%" for c in [0] + cols]
        auto = f"{cells[0]} ({r['chosen']})"
        print(f"{r['shape']:<10}{r['roof']:7.1f}{auto:>16}" + "".join(f"{c:>13}" for c in cells[1:]))


if __name__ == "__main__":
    main()
