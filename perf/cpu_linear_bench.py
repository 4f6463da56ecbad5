"""Which CPU matmul to hold SmolLM2's weights in (issue 12): each candidate at the model's linear
shapes, for decode (M = 1 row), a batch of 8 rows and a prefill chunk of 512.

Each shape is held 30 times over (one copy per layer, as in the model) and the calls cycle
through the copies, so a weight is not in cache when its call comes, as in a real step; the time
is per call, best of --repeats passes. The lm_head is one copy (113 MB in fp32 is cold anyway).

- fp32 / bf16 `F.linear`: the dequantized reference and its half-width variant;
- int8 `_weight_int8pack_mm`: int8 weights, one scale per output row;
- int4 `_weight_int4pack_mm_for_cpu`: int4 weights packed by `_convert_weight_to_int4pack_for_cpu`,
  a scale and a zero per group of 32 inputs (GGUF Q4_0/Q4_1 blocks map onto it);
- int4 unpacked to bf16, then bf16 `F.linear`: the weight expanded on the fly, for many rows
  (the int4 rows use the server's own `Int4Linear`, its kernel call and its unpacking);
- `fp32 act` rows: the int kernels given fp32 activations (measured once at M = 1: slow paths).

GB/s is the weight bytes read per call over the time.

    PYTHONPATH=src python perf/cpu_linear_bench.py [--threads 1] [--repeats 5] [--rows 1,8,512]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lightllm_async.layers.quantized import GROUP, Int4Linear, Int4Weight

# (name, out_features, in_features): SmolLM2-135M's merged qkv, o_proj, gate_up, down; lm_head
SHAPES = [("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
HEAD = ("lm_head", 49152, 576)


def int4_layer(w: torch.Tensor) -> Int4Linear:
    """`w` rounded to 4-bit groups (min/max per group, as Q4_1) in the server's Int4Linear."""
    out_f, in_f = w.shape
    g = w.view(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp_min(1e-8) / 15
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    layer = Int4Linear(in_f, {"": out_f}, False, torch.bfloat16, "cpu")
    layer.load_part(None, "weight", Int4Weight(codes.view(out_f, in_f), scale, lo))
    layer.finish_loading()
    return layer


def candidates(out_f: int, in_f: int, rows: int):
    """`(name, activation dtype, bytes, fn(x))` per way to hold a [out_f, in_f] weight."""
    w = torch.randn(out_f, in_f) * 0.02
    w_bf16 = w.bfloat16()
    scale8 = w.abs().amax(1) / 127
    w8 = (w / scale8[:, None]).round().clamp(-128, 127).to(torch.int8)
    s8_bf16 = scale8.bfloat16()
    int4 = int4_layer(w)
    sz = int4.scale_zero  # torch's packing (Int4Linear holds `_gemv`'s instead where it is built)
    codes = torch.cat([int4.nibbles & 15, int4.nibbles >> 4], 1)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    bf16, fp32 = torch.bfloat16, torch.float32
    out = [
        ("fp32 F.linear", fp32, w.nbytes, lambda x: F.linear(x, w)),
        ("bf16 F.linear", bf16, w_bf16.nbytes, lambda x: F.linear(x, w_bf16)),
        ("int8pack bf16 act", bf16, w8.nbytes, lambda x: torch._weight_int8pack_mm(x, w8, s8_bf16)),
        (
            "int4pack bf16 act",
            bf16,
            packed.nbytes + sz.nbytes,
            lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz),
        ),
        ("int4→bf16 F.linear", bf16, int4.nibbles.nbytes + sz.nbytes, lambda x: F.linear(x, int4.unpacked())),
    ]
    if rows == 1:
        out += [
            ("int8pack fp32 act", fp32, w8.nbytes, lambda x: torch._weight_int8pack_mm(x, w8, scale8)),
            (
                "int4pack fp32 act",
                fp32,
                packed.nbytes + sz.nbytes,
                lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz.float()),
            ),
        ]
    return out


def per_call_seconds(calls, x_by_dtype, repeats: int) -> float:
    """Best pass over the copies (each call on its own copy), per call."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the allocator and the kernels
        t0 = time.perf_counter()
        for dtype, fn in calls:
            fn(x_by_dtype[dtype])
        best = min(best, time.perf_counter() - t0)
    return best / len(calls)


def run(shapes, rows: int, copies: int, repeats: int) -> None:
    print(f"\nM = {rows} rows: µs per call (GB/s of weights read, speed vs fp32)")
    for name, out_f, in_f in shapes:
        n = 1 if name == "lm_head" else copies
        by_kernel: dict[str, list] = {}
        for _ in range(n):
            for kname, dtype, nbytes, fn in candidates(out_f, in_f, rows):
                by_kernel.setdefault(kname, []).append((dtype, fn, nbytes))
        x = torch.randn(rows, in_f)
        xs = {torch.float32: x, torch.bfloat16: x.bfloat16()}
        base = None
        for kname, calls in by_kernel.items():
            s = per_call_seconds([(d, f) for d, f, _ in calls], xs, repeats)
            base = base or s
            gbs = calls[0][2] / s / 1e9
            print(f"  {name:<8} {kname:<20}{s * 1e6:>9.0f} µs {gbs:>6.1f} GB/s {base / s:>6.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copies", type=int, default=30, help="copies of each weight (the model's layers)")
    ap.add_argument("--rows", default="1,8,512", help="M values (tokens per call)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for rows in map(int, args.rows.split(",")):
        copies = args.copies if rows <= 8 else 2  # prefill is compute-bound: no need to evict
        run(SHAPES + ([HEAD] if rows <= 8 else []), rows, copies, args.repeats)


if __name__ == "__main__":
    main()
