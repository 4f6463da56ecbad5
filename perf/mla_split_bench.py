"""MLA decode at small batches: how short a chunk of the context may be.

Times `mla_decode_attention` replayed from a CUDA graph (as the decode step runs it; L2 flushed
between calls) for each batch and context at several minimum chunk lengths. Every variant's
output is checked against the PyTorch reference first. Prints microseconds per call and the
bytes-read roof at the copy rate measured in the same run.

    python perf/mla_split_bench.py [--heads 16,128] [--batches 1,4,16,64] [--contexts 1024,4096]
"""

from __future__ import annotations

import argparse
import importlib

import torch
from kernel_bench import bench_ms, copy_gbps
from mla_moe_bench import mla_inputs  # perf/ is on the path when run from there; src/ then too

from lightllm_async import kernels as K
from lightllm_async.kernels.testing import rel_err

mla = importlib.import_module("lightllm_async.kernels.mla_decode_attention")

VARIANTS = [  # (label, launch overrides)
    ("chunks of one 64-token block at least (default)", dict(min_split=64)),
    ("128 tokens at least", dict(min_split=128)),
    ("256", dict(min_split=256)),
    ("512", dict(min_split=512)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="16,128")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="1024,4096")
    args = ap.parse_args()
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s", flush=True)
    rows = []
    for heads in map(int, args.heads.split(",")):
        for batch in map(int, args.batches.split(",")):
            for ctx in map(int, args.contexts.split(",")):
                inputs = mla_inputs(batch, ctx, heads)
                ref = K.mla_decode_attention_ref(*inputs).float()
                nbytes = inputs[2].nbytes + inputs[0].nbytes * 2 + inputs[1].nbytes
                times = []
                for _, over in VARIANTS:
                    out = K.mla_decode_attention(*inputs, **over)
                    err = rel_err(out.float(), ref)
                    assert err < 1e-2, f"{over}: rel err {err}"
                    call = lambda over=over, inputs=inputs: K.mla_decode_attention(*inputs, **over)  # noqa: E731
                    times.append(bench_ms(call, True))
                launch = mla._launch_config(heads, inputs[0].device, None)
                splits = mla._num_splits(batch, -(-heads // launch.block_h), launch, inputs[0].device)
                rows.append((heads, batch, ctx, splits, nbytes / copy / 1e3, times))
                print(
                    f"  H={heads} B={batch} ctx={ctx}: " + " ".join(f"{t * 1e3:.1f}" for t in times),
                    flush=True,
                )
                del inputs, ref
    print("\nmicroseconds per call (CUDA graph replay), roof = bytes read / copy rate:")
    head = f"{'H':>4}{'B':>5}{'ctx':>6}{'splits':>7}{'roof':>7}" + "".join(
        f"{i:>9}" for i in range(len(VARIANTS))
    )
    print(head)
    for heads, batch, ctx, splits, roof, times in rows:
        best = min(times)
        cells = "".join(f"{t * 1e3:>8.1f}{'*' if t == best else ' '}" for t in times)
        print(f"{heads:>4}{batch:>5}{ctx:>6}{splits:>7}{roof:>7.1f}{cells}")
    for i, (label, _) in enumerate(VARIANTS):
        print(f"  {i}: {label}")


if __name__ == "__main__":
    main()
