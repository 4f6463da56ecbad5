"""Decode attention over a float8 (e4m3) KV cache against the same over bfloat16, and the launch
choices of the float8 one, at Llama-3-8B heads (32 q / 8 kv, dim 128), on CUDA.

    python perf/fp8_decode_bench.py [--shapes 256x640,64x4096,1x4096]

Every variant is first checked against the reference over the same float8 values (widened to
float32), then timed replaying a CUDA graph with L2 flushed; GB/s counts the bytes the op must
move (the cache rows it reads, the token table, q and out), and '% copy' is that against a
device-to-device copy measured in the same run. The last column is the variant's time over the
bfloat16 cache's at the same shape (its chosen launch): a float8 cache moves half the bytes, so
0.5 is its ideal. `--sweep-bf16` also times the bfloat16 cache at the same launches.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import bench_ms, copy_gbps  # noqa: E402  (also puts src/ on the path)

from lightllm_async import kernels as K  # noqa: E402

D = sys.modules["lightllm_async.kernels.decode_attention"]  # the module (the package exports the function)

HQ, HK, DIM = 32, 8, 128


def inputs(batch: int, ctx: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
    rows = batch * ctx
    r2t = torch.randperm(rows, device="cuda", generator=g).view(batch, ctx).int()
    kc = torch.randn(rows, HK, DIM, device="cuda", generator=g).to(dtype)
    vc = torch.randn(rows, HK, DIM, device="cuda", generator=g).to(dtype)
    q = torch.randn(batch, HQ, DIM, device="cuda", generator=g).bfloat16()
    req_idx = torch.arange(batch, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    nbytes = kc.nbytes + vc.nbytes + r2t.nbytes + 2 * q.nbytes
    return (q, kc, vc, r2t, req_idx, seq_lens, DIM**-0.5), nbytes


def check(args) -> float:
    """Largest |kernel - reference| over a few requests (the reference reads the same float8 values)."""
    out = K.decode_attention(*args)
    q, kc, vc, r2t, req_idx, seq_lens, scale = args
    n = min(4, q.shape[0])
    ref = K.decode_attention_ref(q[:n].float(), kc.float(), vc.float(), r2t, req_idx[:n], seq_lens[:n], scale)
    return (out[:n].float() - ref).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", default="256x640,64x4096,1x4096", help="batch x context, comma-separated")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--block-n", default="64,128")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--sweep-bf16", action="store_true", help="also the bfloat16 cache's launches")
    args = parser.parse_args()
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"device-to-device copy: {copy:.0f} GB/s", flush=True)
    default, default_bf16 = dict(D.LAUNCH[1]), dict(D.LAUNCH[2])
    launches = list(
        itertools.product(
            map(int, args.warps.split(",")),
            map(int, args.block_n.split(",")),
            map(int, args.stages.split(",")),
        )
    )
    variants = [dict(default)] + [
        dict(f16=f16, warps=w, block_n=n, stages=s) for f16 in (True, False) for w, n, s in launches
    ]
    bf16_variants = (
        [dict(f16=False, warps=w, block_n=n, stages=s) for w, n, s in launches] if args.sweep_bf16 else []
    )
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = map(int, shape.split("x"))
        bf_args, bf_bytes = inputs(batch, ctx, torch.bfloat16)
        bf_err = check(bf_args)
        bf_ms = bench_ms(lambda a=bf_args: K.decode_attention(*a), graph=True)
        rows.append((shape, "bfloat16 cache", bf_err, bf_ms, bf_bytes / bf_ms / 1e6, 1.0))
        print(rows[-1], flush=True)
        for v in bf16_variants:
            D.LAUNCH[2].update(v)
            ms = bench_ms(lambda a=bf_args: K.decode_attention(*a), graph=True)
            name = f"  bf16 w{v['warps']} n{v['block_n']} s{v['stages']}"
            rows.append((shape, name, check(bf_args), ms, bf_bytes / ms / 1e6, ms / bf_ms))
            print(rows[-1], flush=True)
        D.LAUNCH[2].update(default_bf16)
        del bf_args
        f8_args, f8_bytes = inputs(batch, ctx, torch.float8_e4m3fn)
        for i, v in enumerate(variants):
            D.LAUNCH[1].update(v)
            name = f"f16={int(v['f16'])} w{v['warps']} n{v['block_n']} s{v['stages']}"
            name = ("default " if i == 0 else "") + name
            try:
                err = check(f8_args)
                ms = bench_ms(lambda a=f8_args: K.decode_attention(*a), graph=True)
            except Exception as e:  # a launch the card refuses (shared memory): say so, time the rest
                print(f"{shape} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            rows.append((shape, name, err, ms, f8_bytes / ms / 1e6, ms / bf_ms))
            print(rows[-1], flush=True)
        D.LAUNCH[1].update(default)
        del f8_args
        torch.cuda.empty_cache()
    head = ("B x ctx", "cache / launch", "max err", "us", "GB/s", "% copy", "/ bf16")
    print("\n{:<10} {:<26} {:>8} {:>8} {:>7} {:>7} {:>7}".format(*head))
    for shape, name, err, ms, gbps, rel in rows:
        pct = 100 * gbps / copy
        print(f"{shape:<10} {name:<26} {err:8.4f} {1000 * ms:8.1f} {gbps:7.0f} {pct:6.1f}% {rel:7.2f}")


if __name__ == "__main__":
    main()
