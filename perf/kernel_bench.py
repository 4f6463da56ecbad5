"""Time every kernel against its PyTorch reference on CUDA and against the card's copy bandwidth.

    python perf/kernel_bench.py [--splits 1,2,4,8,16]

Kernels are timed replaying CUDA graphs (as decode runs in the server), references eagerly.
Bandwidth-bound ops report achieved GB/s (bytes the op must move / median time) and that as a share
of a device-to-device copy measured in the same run; prefill attention is compute-bound and reports
TFLOP/s. The headline is decode attention at batch 64, context 4096, Llama-3-8B heads (32 q / 8 kv,
dim 128) in bf16: the goal is >= 75% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lightllm_async import kernels as K  # noqa: E402

DTYPE = torch.bfloat16
DEV = "cuda"


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    kernel: Callable[[], object]
    ref: Callable[[], object] | None
    nbytes: int  # bytes the op must move at the least
    flops: int = 0  # for compute-bound ops
    args: tuple = ()  # the kernel's arguments, where a caller times variants of it


def bench_ms(fn: Callable[[], object], graph: bool = False) -> float:
    """Median milliseconds per call, with L2 flushed between calls. With `graph`, the call is
    replayed from a CUDA graph, as decode runs in the server, so that Python launch overhead does
    not hide the time of small kernels."""
    if graph:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            fn()  # compile and warm up outside the capture
        side.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        fn = cuda_graph.replay
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


@triton.jit
def _read_kernel(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads n int32 words, each program a contiguous run of ITERS blocks, and writes one word a
    program (the bits summed, so that nothing is optimized away): a plain streaming read."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0)
    tl.store(OUT + tl.program_id(0), tl.sum(acc))


def read_launch(x: torch.Tensor, out: torch.Tensor, programs: int, block: int = 2048) -> None:
    """`_read_kernel` over x (viewed as int32 words) with about `programs` programs; out holds
    at least that many words."""
    words = x.view(torch.int32).view(-1)
    iters = triton.cdiv(words.numel(), block * programs)
    grid = triton.cdiv(words.numel(), block * iters)
    _read_kernel[(grid,)](words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=4)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, device=DEV)


def cache(batch: int, ctx: int, kv_heads: int, dim: int):
    """A KV cache of batch * ctx rows, each request's rows scattered over it at random."""
    rows = batch * ctx
    req_to_token = torch.randperm(rows, device=DEV, dtype=torch.int64).view(batch, ctx).int()
    return rand(rows, kv_heads, dim), rand(rows, kv_heads, dim), req_to_token


def decode_case(batch: int, ctx: int, hq: int, hk: int, dim: int, splits: int | None = None) -> Case:
    kc, vc, r2t = cache(batch, ctx, hk, dim)
    q = rand(batch, hq, dim)
    req_idx = torch.arange(batch, device=DEV, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    args = (q, kc, vc, r2t, req_idx, seq_lens, dim**-0.5)
    nbytes = kc.nbytes + vc.nbytes + r2t.nbytes + 2 * q.nbytes
    tag = "" if splits is None else f" splits={splits}"
    return Case(
        "decode_attention" + tag, f"B={batch} ctx={ctx} H={hq}/{hk} D={dim}",
        lambda: K.decode_attention(*args, num_splits=splits),
        (lambda: K.decode_attention_ref(*args)) if splits is None else None, nbytes,
    )  # fmt: skip


def prefill_case(batch: int, new: int, prefix: int, hq: int, hk: int, dim: int) -> Case:
    ctx = prefix + new
    kc, vc, r2t = cache(batch, ctx, hk, dim)
    q = rand(batch * new, hq, dim)
    req_idx = torch.arange(batch, device=DEV, dtype=torch.int32)
    q_start = torch.arange(0, batch * new + 1, new, device=DEV, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    args = (q, kc, vc, r2t, req_idx, q_start, seq_lens, dim**-0.5)
    visible = new * prefix + new * (new + 1) // 2  # (query, key) pairs per request and head
    flops = 4 * batch * visible * hq * dim
    nbytes = kc.nbytes + vc.nbytes + 2 * q.nbytes
    return Case(
        "prefill_attention", f"B={batch} new={new} prefix={prefix} H={hq}/{hk} D={dim}",
        lambda: K.prefill_attention(*args), lambda: K.prefill_attention_ref(*args), nbytes, flops, args,
    )  # fmt: skip


def simple_cases(tokens: int) -> list[Case]:
    hidden, inter, hq, hk, dim = 4096, 14336, 32, 8, 128
    x, res, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    gate_up = rand(tokens, 2 * inter)
    q, k = rand(tokens, hq, dim), rand(tokens, hk, dim)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)
    cos_sin = K.rope_cache(dim, 8192, 500000.0, None, DEV)
    kc, vc = rand(4 * tokens, hk, dim), rand(4 * tokens, hk, dim)
    slots = torch.randperm(4 * tokens, device=DEV)[:tokens]
    shape = f"T={tokens}"
    return [
        Case("rms_norm", f"{shape} N={hidden}", lambda: K.rms_norm(x, w, 1e-5),
             lambda: K.rms_norm_ref(x, w, 1e-5), 2 * x.nbytes),
        Case("rms_norm+residual", f"{shape} N={hidden}", lambda: K.rms_norm(x, w, 1e-5, res),
             lambda: K.rms_norm_ref(x, w, 1e-5, res), 4 * x.nbytes),
        Case("silu_and_mul", f"{shape} I={inter}", lambda: K.silu_and_mul(gate_up),
             lambda: K.silu_and_mul_ref(gate_up), gate_up.nbytes * 3 // 2),
        Case("rotary_emb", f"{shape} H={hq}/{hk} D={dim}", lambda: K.rotary_emb(q, k, pos, cos_sin),
             lambda: K.rotary_emb_ref(q, k, pos, cos_sin), 2 * (q.nbytes + k.nbytes) + tokens * dim * 4),
        Case("store_kv", f"{shape} Hk={hk} D={dim}", lambda: K.store_kv(kc, vc, k, k, slots),
             lambda: K.store_kv_ref(kc, vc, k, k, slots), 4 * k.nbytes),
    ]  # fmt: skip


def row(case: Case, copy: float) -> str:
    ms = bench_ms(case.kernel, graph=True)
    ref_ms = bench_ms(case.ref) if case.ref is not None else float("nan")
    gbps = case.nbytes / ms / 1e6
    rate = f"{case.flops / ms / 1e9:8.1f} TFLOP/s" if case.flops else f"{100 * gbps / copy:7.1f}% copy"
    return f"{case.name:<28} {case.shape:<38} {ref_ms:9.3f} {ms:9.3f} {ref_ms / ms:8.1f}x {gbps:9.0f}  {rate}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--splits", default="", help="also time decode at these num_splits, e.g. 1,2,4,8")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the kernel benchmark needs a CUDA device"
    torch.manual_seed(0)
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"device-to-device copy: {copy:.0f} GB/s\n")
    print(f"{'op':<28} {'shape':<38} {'ref ms':>9} {'ms':>9} {'speedup':>9} {'GB/s':>9}  rate")
    cases = [lambda: decode_case(64, 4096, 32, 8, 128)]
    cases += [lambda s=s: decode_case(64, 4096, 32, 8, 128, int(s)) for s in args.splits.split(",") if s]
    cases += [
        lambda: decode_case(1, 4096, 32, 8, 128),
        lambda: decode_case(8, 1024, 32, 8, 128),
        lambda: decode_case(256, 512, 32, 8, 128),
        lambda: decode_case(64, 4096, 32, 8, 64),
        lambda: prefill_case(1, 4096, 0, 32, 8, 128),
        lambda: prefill_case(4, 1024, 3072, 32, 8, 128),
        lambda: prefill_case(16, 256, 0, 32, 8, 128),
    ]
    for make in cases:
        print(row(make(), copy), flush=True)
        torch.cuda.empty_cache()
    for case in simple_cases(4096):
        print(row(case, copy), flush=True)


if __name__ == "__main__":
    main()
