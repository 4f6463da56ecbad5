"""Time the DeepSeek kernels (MLA decode attention, fused MoE, its alignment and routing) against
their PyTorch references on CUDA, and against the card's ceilings measured in the same run.

    python perf/mla_moe_bench.py [--only mla|moe] [--no-ref] [--sweep] [--moe-m 1,8,...] [--out FILE]

Kernels are timed replaying CUDA graphs (as decode runs in the server), references eagerly, L2
flushed between calls. MLA decode reports GB/s (latent + rope rows, queries and output: the bytes it
must move) as a share of a device-to-device copy, and TFLOP/s, since at 128 heads it does ~240 FLOP
per byte and is bound by the tensor cores rather than by memory. Fused MoE reports GB/s over the
weights of the experts the batch touches (plus activations) as a share of the copy rate, and TFLOP/s
as a share of a bf16 8192^3 matmul, at the V2-Lite and V3 shapes for each token count M of --moe-m
(default 1,8,32,64,128,256,1024,8192). Goals (issue 9): MLA >= 80% of copy at batch 64/128, contexts
1k-8k, 16 and 128 heads; MoE >= 70% of the bandwidth roofline for M = 1-256 and >= 50% of the
matmul rate at M = 8192. The MoE half then times the whole MoE layer of models/deepseek.py at the
same shapes and Ms three ways: the shared experts (2 in V2-Lite, 1 in V3) fused into fused_moe's
pass, fused_moe over the routed experts plus the separate shared MLP, and the layer as the model
builds it by default on CUDA (fused up to `shared_fused_max_tokens` tokens, above that the shared
experts as an MLP through views of the fused weights; the router's one GEMM).

Where fused_moe launches its GEMMs without the alignment kernel (one token: `DIRECT_MAX_TOKENS`),
a second row times the aligned launch, as larger M runs it.

--chain L adds, under each row, the same op timed as the server runs it: L calls over distinct data
(the layers of a decode step: other caches, other experts) captured back to back in one CUDA graph,
per call, L2 flushed before each replay. The single-call row carries the harness's floor (the
graph's launch and the timing events, ~5 us, printed as `floor`) and each kernel's ramp-up alone; in
the chain, as in the server, each kernel follows another (a PDL launch starts during it). With
--chain and one token, the MoE rows are also split into its two GEMMs (gate/up with SiLU, down),
each chained alone.

--mla-no-merge (with --chain) adds the chained MLA row again with the chunk merge stubbed out: the
split kernel alone, which shows what the merge costs. --mla-spread S draws each request's context
from [ctx * (1 - S), ctx * (1 + S)] instead of ctx for all (the bytes counted are the contexts' own;
a server's contexts differ, and the chunks of the longer ones then run last). --mla-shared-table adds
the chain again with every call reading the first one's request table and lengths, as the layers of
a DeepSeek step do (the other chain gives each call its own table, so that its rows come from DRAM).
--mla-ceiling adds, under each chained MLA row, plain data movement of the same byte count chained
the same way: a device-to-device copy of half the bytes (read + write, the copy rate's own measure
at this size) and a streaming read of all of them (the best of 2-32 programs an SM). What those
reach is the bandwidth a kernel of that size can get at all; the copy rate, taken over 1 GiB, does
not pay the start and tail that tens of MB do.
--mla-order adds the chain again with each call given its requests longest first, as the runner
orders a decode-only step, under the LLA_MLA_SPREAD modes always and auto (the default).

--sweep also times the launch alternatives of each case (chained, with --chain) and prints the best;
with --out FILE, the best MoE tiles per shape and M go into FILE in the format kernels/fused_moe.py
reads (merged into FILE when it holds an earlier sweep on the same card, so that the Ms may be split
over several calls). Copy FILE to the name it prints, under src/lightllm_async/kernels/tuned/. The
tuning call:

    python perf/mla_moe_bench.py --only moe --sweep --no-ref --out moe_tuned.json

Tile candidates that fail to compile on the card are skipped with a line saying why. A sweep of
both halves takes several minutes, so on a device run give each half its own call (--only). The V3
MoE shape holds 22.5 GB of expert weights, its layer comparison twice that.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import bench_ms, copy_gbps, read_launch  # noqa: E402  (also puts src/ on the path)

from lightllm_async import kernels as K  # noqa: E402
from lightllm_async.kernels.testing import rel_err  # noqa: E402
from lightllm_async.models.deepseek import ALWAYS, MoE, shared_fused_max_tokens  # noqa: E402
from lightllm_async.tools.make_random_model import shape_config  # noqa: E402

mla_module = importlib.import_module("lightllm_async.kernels.mla_decode_attention")
moe_module = importlib.import_module("lightllm_async.kernels.fused_moe")

DTYPE, DEV = torch.bfloat16, "cuda"
RANK, ROPE = 512, 64
MOE_SHAPES = {  # name: (hidden, intermediate, experts, top_k)
    "v2-lite": (2048, 1408, 64, 6),
    "v3": (7168, 2048, 256, 8),
}
MOE_MODELS = {"v2-lite": "deepseek-v2-lite", "v3": "deepseek-v3"}  # their shape_config names
MOE_M = "1,8,32,64,128,256,1024,8192"


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    kernel: Callable[[], object]
    ref: Callable[[], object] | None
    nbytes: int  # bytes the op must move at the least
    flops: int


def chain_row(cases: list[Case], copy: float, mm: float) -> tuple[str, float]:
    """cases: one op over distinct data; per-call ms of all of them replayed back to back in one graph."""
    calls = [case.kernel for case in cases]
    ms = bench_ms(lambda: [call() for call in calls], graph=True) / len(cases)
    nbytes, flops = sum(c.nbytes for c in cases) / len(cases), sum(c.flops for c in cases) / len(cases)
    name = f"  x{len(cases)} chained {cases[0].name}"
    return rate_line(name, cases[0].shape, f"{'':>9}", ms, f"{'':>9}", nbytes, flops, copy, mm), ms


def rate_line(name: str, shape: str, ref: str, ms: float, speedup: str, nbytes, flops, copy, mm) -> str:
    """A table row: the op, its reference columns as given, then its time and rates against the ceilings."""
    gbps, tflops = nbytes / ms / 1e6, flops / ms / 1e9
    return (
        f"{name:<34} {shape:<30} {ref} {ms:9.4f} {speedup} "
        f"{gbps:7.0f} {100 * gbps / copy:6.1f}% {tflops:7.1f} {100 * tflops / mm:6.1f}%"
    )


def floor_us() -> float:
    """The harness's floor: a one-element add replayed from a graph, L2 flushed, in microseconds."""
    t = torch.zeros(1, device=DEV)
    return 1e3 * bench_ms(lambda: t.add_(1), graph=True)


def matmul_tflops() -> float:
    a, b = torch.randn(2, 8192, 8192, dtype=DTYPE, device=DEV)
    return 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9


def mla_inputs(batch: int, ctx: int, heads: int, spread: float = 0.0) -> tuple:
    width = int(ctx * (1 + spread))
    rows = batch * width
    kv_cache = torch.randn(rows, RANK + ROPE, dtype=DTYPE, device=DEV)
    req_to_token = torch.randperm(rows, device=DEV).view(batch, width).int()
    q_nope = torch.randn(batch, heads, RANK, dtype=DTYPE, device=DEV)
    q_pe = torch.randn(batch, heads, ROPE, dtype=DTYPE, device=DEV)
    req_idx = torch.arange(batch, device=DEV, dtype=torch.int32)
    seq_lens = torch.randint(int(ctx * (1 - spread)), width + 1, (batch,), device=DEV, dtype=torch.int32)
    return q_nope, q_pe, kv_cache, req_to_token, req_idx, seq_lens, 192**-0.5


def mla_layer_like(inputs: tuple) -> tuple:
    """Another layer's MLA decode inputs for the same requests: its own queries and cache, the
    same request table and lengths (a step's layers share those)."""
    return (*(torch.randn_like(t) for t in inputs[:3]), *inputs[3:])


def mla_case(inputs: tuple, tag: str = "", **launch) -> Case:
    q_nope, q_pe, kv_cache, req_to_token, _, seq_lens, _ = inputs
    batch, heads, _ = q_nope.shape
    tokens = int(seq_lens.sum())  # a host sync, outside anything timed
    nbytes = tokens * (kv_cache[0].nbytes + req_to_token[0, 0].nbytes) + 2 * q_nope.nbytes + q_pe.nbytes
    flops = 2 * tokens * heads * (RANK + ROPE + RANK)
    tag = tag or " ".join(f"{k}={v}" for k, v in launch.items())
    return Case(
        "mla_decode " + tag, f"B={batch} ctx={tokens // batch} H={heads}",
        lambda: K.mla_decode_attention(*inputs, **launch), lambda: K.mla_decode_attention_ref(*inputs),
        nbytes, flops,
    )  # fmt: skip


def moe_weights(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, inter, experts, _ = MOE_SHAPES[shape]
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=DTYPE, device=DEV).mul_(hidden**-0.5)
    w2 = torch.randn(experts, hidden, inter, dtype=DTYPE, device=DEV).mul_(inter**-0.5)
    return w13, w2


def moe_inputs(shape: str, tokens: int, w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    hidden, _, experts, top_k = MOE_SHAPES[shape]
    x = torch.randn(tokens, hidden, dtype=DTYPE, device=DEV)
    logits = torch.randn(tokens, experts, device=DEV)
    bias = torch.randn(experts, device=DEV) * 0.1
    if shape == "v3":
        weights, ids = K.select_experts(logits, top_k, "noaux_tc", 8, 4, True, 2.5, bias)
    else:
        weights, ids = K.select_experts(logits, top_k, "greedy")
    return x, w13, w2, weights, ids, logits, bias


def moe_chain_inputs(shape: str, tokens: int, w13: torch.Tensor, w2: torch.Tensor, layers: int) -> list:
    """`layers` routings over the same weights, as the layers of a step route to their own experts:
    at one token each layer takes experts no other layer of the chain takes (while there are enough),
    so that no call reads weights an earlier one left in L2."""
    _, _, experts, top_k = MOE_SHAPES[shape]
    out = []
    for layer in range(layers):
        x, w13, w2, weights, ids, logits, bias = moe_inputs(shape, tokens, w13, w2)
        if tokens == 1 and (layer + 1) * top_k <= experts:
            ids = torch.arange(layer * top_k, (layer + 1) * top_k, device=DEV, dtype=ids.dtype).view(1, top_k)
        out.append((x, w13, w2, weights, ids, logits, bias))
    return out


def moe_part_cases(shape: str, inputs) -> tuple[Case, Case]:
    """fused_moe's two GEMMs at one token (direct launch) with its tiles, each alone: gate/up with
    SiLU-and-mul, then down with the routing weights."""
    x, w13, w2, weights, ids, _, _ = inputs
    hidden, inter, _, top_k = MOE_SHAPES[shape]
    cfg = moe_module.moe_config(1, top_k, w13.shape[0], inter, hidden, x.device)
    aligned = (None, ids.view(-1), None)
    act = torch.randn(top_k, inter, dtype=DTYPE, device=DEV)
    down = torch.empty(top_k, hidden, dtype=DTYPE, device=DEV)
    gate_up = Case(
        "moe_gate_up", f"{shape} M=1", lambda: moe_module._grouped_gemm(
            x, w13, act, weights, aligned, top_k, inter, cfg, False, True, False),
        None, top_k * 2 * inter * hidden * x.element_size(), 2 * top_k * 2 * inter * hidden,
    )  # fmt: skip
    down_case = Case(
        "moe_down", f"{shape} M=1", lambda: moe_module._grouped_gemm(
            act, w2, down, weights, aligned, top_k, hidden, cfg, True, False, True),
        None, top_k * inter * hidden * x.element_size(), 2 * top_k * inter * hidden,
    )  # fmt: skip
    return gate_up, down_case


def tiles_str(config: K.MoeConfig) -> str:
    """block_m,block_n,block_k,group_m,warps,stages"""
    return ",".join(map(str, dataclasses.astuple(config)))


def moe_case(
    shape: str, tokens: int, inputs, config: K.MoeConfig | None = None, direct=None, tag="", sum_experts=True
) -> Case:
    x, w13, w2, weights, ids, _, _ = inputs
    hidden, inter, _, top_k = MOE_SHAPES[shape]
    touched = ids.unique().numel()  # a host sync here, outside anything timed
    nbytes = touched * 3 * inter * hidden * w13.element_size() + 2 * x.nbytes
    flops = 2 * tokens * top_k * 3 * inter * hidden
    tag = tag or ("" if config is None else " " + tiles_str(config))
    return Case(
        "fused_moe" + tag, f"{shape} M={tokens} experts={touched}",
        lambda: K.fused_moe(x, w13, w2, weights, ids, config, sum_experts, direct),
        lambda: K.fused_moe_ref(x, w13, w2, weights, ids), nbytes, flops,
    )  # fmt: skip


def row(case: Case, copy: float, mm: float, ref: bool) -> tuple[str, float]:
    ms = bench_ms(case.kernel, graph=True)
    ref_ms = bench_ms(case.ref) if ref and case.ref is not None else float("nan")
    ref_cols, speedup = f"{ref_ms:9.3f}", f"{ref_ms / ms:8.1f}x"
    return rate_line(case.name, case.shape, ref_cols, ms, speedup, case.nbytes, case.flops, copy, mm), ms


def mla_rows(args, copy: float, mm: float) -> None:
    for heads in (16, 128):
        for batch in (64, 128, 192, 256):  # 192 and 256 only where --mla-cases names them
            for ctx in (1024, 4096, 8192):
                if args.mla_cases and f"{heads}:{batch}:{ctx}" not in args.mla_cases.split(","):
                    continue
                if batch > 128 and not args.mla_cases:
                    continue
                inputs = mla_inputs(batch, ctx, heads, args.mla_spread)
                print(row(mla_case(inputs), copy, mm, not args.no_ref)[0], flush=True)
                layers = None
                if args.chain:
                    more = [mla_inputs(batch, ctx, heads, args.mla_spread) for _ in range(args.chain - 1)]
                    layers = [inputs, *more]
                    mla_chain_rows(inputs, layers, args, copy, mm)
                if args.sweep:
                    mla_sweep(inputs, copy, mm, layers)
                del layers
                del inputs
                torch.cuda.empty_cache()
    for batch, ctx in () if args.mla_cases else ((1, 4096), (8, 2048)):  # small batches lean on the split
        print(row(mla_case(mla_inputs(batch, ctx, 16)), copy, mm, not args.no_ref)[0], flush=True)


def mla_chain_rows(inputs: tuple, layers: list, args, copy: float, mm: float) -> None:
    """The chained MLA row, and with --mla-no-merge / --mla-shared-table its variants."""
    print(chain_row([mla_case(x) for x in layers], copy, mm)[0], flush=True)
    if args.mla_order:
        mla_order_rows(layers, copy, mm)
    if args.mla_no_merge:
        mla_no_merge_row(layers, copy, mm)
        if args.mla_order:  # the ordered rows without their merges: what the merge launch costs there
            with _merges_stubbed():
                mla_order_rows(layers, copy, mm, ", no merge")
    if args.mla_ceiling:
        ceiling_rows(mla_case(inputs).nbytes, len(layers), copy, mm)
    if args.mla_shared_table:  # the same chain over one request table, as a step's layers read
        shared = [inputs] + [mla_layer_like(inputs) for _ in range(len(layers) - 1)]
        print(chain_row([mla_case(x, "shared table") for x in shared], copy, mm)[0], flush=True)
        if args.mla_no_merge:
            mla_no_merge_row(shared, copy, mm, "shared table, no merge")


def mla_order_rows(layers: list, copy: float, mm: float, suffix: str = "") -> None:
    """The chained row again with each call given its requests longest first (`order`, as the
    runner gives it), under the LLA_MLA_SPREAD modes that use it: twice the chunks always
    ("always"), twice the chunks where the lengths spread ("auto", the default). ("never" is the
    plain row.)"""
    mode = mla_module._SPREAD
    try:
        for spread in ("always", "auto"):
            mla_module._SPREAD = spread
            cases = []
            for x in layers:
                lens = x[5]
                order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
                flag = mla_module.lengths_spread(int(lens.max()), int(lens.sum()), len(lens))
                flag = torch.tensor([int(flag)], dtype=torch.int32, device=DEV)  # as the runner's
                cases.append(mla_case(x, f"order {spread}{suffix}", order=order, spread=flag))
            print(chain_row(cases, copy, mm)[0], flush=True)
    finally:
        mla_module._SPREAD = mode


def ceiling_rows(nbytes: int, calls: int, copy: float, mm: float) -> None:
    """What plain data movement of the op's byte count reaches in the same chain: a copy of half
    the bytes (read + write: the copy rate's own measure, at this size), and a streaming read of
    all of them (the best of a few grid sizes), each `calls` times over distinct buffers."""
    half = nbytes // 2
    mb = f"{nbytes / 1e6:.1f} MB"
    pairs = [torch.empty(2, half, dtype=torch.uint8, device=DEV) for _ in range(calls)]
    cases = [Case("copy, same bytes", mb, lambda p=p: p[1].copy_(p[0]), None, 2 * half, 0) for p in pairs]
    print(chain_row(cases, copy, mm)[0], flush=True)
    del pairs, cases
    bufs = [torch.randint(0, 255, (nbytes // 4 * 4,), dtype=torch.uint8, device=DEV) for _ in range(calls)]
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    best = None
    for per_sm in (2, 4, 8, 16, 32):
        out = torch.empty(per_sm * sms + 1, dtype=torch.int32, device=DEV)
        cases = [Case(f"read, same bytes, {per_sm}/SM", mb,
                      lambda b=b, out=out, n=per_sm * sms: read_launch(b, out, n), None, b.numel(), 0)
                 for b in bufs]  # fmt: skip
        line, ms = chain_row(cases, copy, mm)
        best = min(best or (ms, line), (ms, line))
    print(best[1], flush=True)


class _NoLaunch:  # stands in for a Triton kernel and launches nothing
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _merges_stubbed():
    """The MLA chunk merges (per head, and of a doubled one-chunk cut) launch nothing (bench only:
    the answers are then wrong; the times say what the merges cost)."""
    names = ("_mla_decode_merge_kernel", "_mla_decode_merge_pair_kernel")
    saved = [getattr(mla_module, n) for n in names]
    for n in names:
        setattr(mla_module, n, _NoLaunch())
    try:
        yield
    finally:
        for n, k in zip(names, saved, strict=True):
            setattr(mla_module, n, k)


def mla_no_merge_row(layers: list, copy: float, mm: float, tag: str = "no merge") -> None:
    """The chained row again with the chunk merge stubbed out (bench only): the split kernel alone,
    and so what the merge costs."""
    with _merges_stubbed():
        print(chain_row([mla_case(x, tag) for x in layers], copy, mm)[0], flush=True)


MLA_LAUNCHES = [  # (heads per program, tokens per iteration, warps, stages)
    (16, 16, 4, 2), (16, 32, 4, 2), (16, 32, 4, 3), (16, 64, 4, 2), (16, 64, 4, 3), (16, 64, 8, 2),
    (16, 32, 8, 3), (16, 128, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2),
    (64, 64, 8, 2), (64, 32, 16, 2), (64, 64, 16, 2), (128, 32, 16, 2),
    # deeper pipelines over smaller tiles (2026-11-30, ninth session): more bytes in flight per program
    (16, 32, 4, 4), (16, 32, 4, 5), (16, 16, 4, 6), (16, 32, 8, 4),
]  # fmt: skip


# the split counts the MLA sweep tries (LLA_MLA_SWEEP_SPLITS=1,2,4,8 shortens a device call)
SWEEP_SPLITS = tuple(int(s) for s in os.environ.get("LLA_MLA_SWEEP_SPLITS", "1,2,4,8,16,32").split(","))


def mla_sweep(inputs: tuple, copy: float, mm: float, layers: list | None = None) -> None:
    """Every launch of MLA_LAUNCHES that the heads fill, at several split counts; prints the best
    three. A launch that fails to compile (shared memory, registers) is reported and skipped.
    Timed chained over `layers` (inputs of the same shape) where given."""
    heads = inputs[0].shape[1]
    launches = [mla_module._Launch(bh, bn, w, st, 1, 1) for bh, bn, w, st in MLA_LAUNCHES if heads >= bh]
    results, default = [], mla_module._launch_config
    for launch in launches:
        mla_module._launch_config = lambda *_, launch=launch: launch  # read at each call
        try:
            for splits in SWEEP_SPLITS:
                if layers:
                    line, ms = chain_row([mla_case(x, num_splits=splits) for x in layers], copy, mm)
                else:
                    line, ms = row(mla_case(inputs, num_splits=splits), copy, mm, False)
                results.append((ms, f"h{launch.block_h} n{launch.block_n} w{launch.num_warps} "
                                f"s{launch.num_stages} splits={splits}: {line.split()[-4]} GB/s "
                                f"{line.split()[-2]} TFLOP/s"))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (a launch the card cannot compile or run)
            print(f"    {launch}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        finally:
            mla_module._launch_config = default
    for ms, desc in sorted(results)[:3]:
        print(f"    best {ms * 1e3:8.1f} us  {desc}", flush=True)


MOE_CONFIGS = [
    K.MoeConfig(bm, bn, bk, g, w, s)
    for bm, bn, bk, g, w, s in (
        # M = 1-8: one thin row block per expert, the weights streamed
        (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3), (16, 32, 128, 1, 4, 5),
        (16, 128, 64, 1, 4, 4), (16, 64, 64, 1, 4, 5), (16, 256, 64, 1, 8, 3),
        # more, thinner column slices with deeper pipelines: more programs, more bytes in flight
        (16, 16, 256, 1, 4, 4), (16, 16, 128, 1, 4, 6), (16, 32, 256, 1, 4, 4), (16, 32, 128, 1, 8, 6),
        (16, 16, 512, 1, 4, 3),
        # tens to hundreds of rows per expert
        (32, 64, 128, 8, 4, 3), (32, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3),
        (64, 128, 64, 16, 4, 4), (64, 128, 64, 8, 4, 4),
        # large M on H100/H200: wide wgmma tiles, deep pipelines
        (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3), (64, 256, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3), (128, 256, 64, 16, 8, 3),
    )
]  # fmt: skip


def moe_rows(args, copy: float, mm: float) -> None:
    tuned: dict[str, dict[str, dict]] = {}
    shapes = args.moe_shapes.split(",")
    for shape in shapes:
        hidden, inter, experts, _ = MOE_SHAPES[shape]
        w13, w2 = moe_weights(shape)
        for tokens in args.moe_m:
            inputs = moe_inputs(shape, tokens, w13, w2)
            print(row(moe_case(shape, tokens, inputs), copy, mm, not args.no_ref)[0], flush=True)
            layers = moe_chain_inputs(shape, tokens, w13, w2, args.chain) if args.chain else None
            if layers:
                print(chain_row([moe_case(shape, tokens, x) for x in layers], copy, mm)[0], flush=True)
                if tokens == 1:  # as DeepSeek's layer calls it: the experts' sum left to the next norm
                    cases = [moe_case(shape, tokens, x, tag=" unsummed", sum_experts=False) for x in layers]
                    print(chain_row(cases, copy, mm)[0], flush=True)
                    parts = [moe_part_cases(shape, x) for x in layers]
                    for i in range(2):
                        print(row(parts[0][i], copy, mm, False)[0], flush=True)
                        print(chain_row([p[i] for p in parts], copy, mm)[0], flush=True)
            if tokens <= moe_module.DIRECT_MAX_TOKENS:  # the default launch is direct: also aligned
                case = moe_case(shape, tokens, inputs, direct=False, tag=" aligned (as M > 1)")
                print(row(case, copy, mm, False)[0], flush=True)
            if args.sweep:
                best = moe_sweep(shape, tokens, inputs, copy, mm, layers)
                key = moe_module.moe_shape_key(experts, inter, hidden)
                tuned.setdefault(key, {})[str(tokens)] = dataclasses.asdict(best)
            print(overheads(shape, inputs), flush=True)
            del inputs, layers
            torch.cuda.empty_cache()
        del w13, w2
        torch.cuda.empty_cache()
    if args.out and tuned:
        write_tuned(args.out, tuned)
    for shape in () if args.no_layers else shapes:
        shared_rows(shape, *moe_layers(shape), args.moe_m)
        torch.cuda.empty_cache()  # the layers went with the call


def write_tuned(path: str, tuned: dict[str, dict[str, dict]]) -> None:
    """The tiles in the format of kernels/fused_moe.py, merged into those of an earlier sweep on
    the same card that `path` holds."""
    device = torch.cuda.get_device_name()
    shapes: dict[str, dict[str, dict]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("device") == device:
            shapes = earlier["shapes"]
    for key, buckets in tuned.items():
        shapes.setdefault(key, {}).update(buckets)
    for key, buckets in shapes.items():
        shapes[key] = dict(sorted(buckets.items(), key=lambda kv: int(kv[0])))
    doc = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "shapes": shapes}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {path}: copy it to {os.path.relpath(moe_module.tuned_file(device))}\n", flush=True)


def overheads(shape: str, inputs: tuple) -> str:
    """The routing (V3's noaux_tc, one fused shared expert appended) and the alignment that precede
    the GEMMs, timed alone; the routing also through its PyTorch reference, both in CUDA graphs."""
    _, _, experts, top_k = MOE_SHAPES[shape]
    _, _, _, _, ids, logits, bias = inputs
    route_args = (logits, top_k, "noaux_tc", 8, 4, True, 2.5, bias, 1)
    align_ms = bench_ms(lambda: K.moe_align_block_size(ids, experts, 16), graph=True)
    route_ms = bench_ms(lambda: K.select_experts(*route_args), graph=True)
    ref_ms = bench_ms(lambda: K.select_experts_ref(*route_args), graph=True)
    return (
        f"    moe_align_block_size {1e3 * align_ms:6.1f} us   select_experts {1e3 * route_ms:6.1f} us"
        f" (PyTorch reference {1e3 * ref_ms:6.1f} us)"
    )


def moe_sweep(shape: str, tokens: int, inputs: tuple, copy: float, mm: float, layers=None) -> K.MoeConfig:
    """The fastest of the candidate tiles that compile, with a line for each that does not; timed in
    a chain over `layers` (moe_chain_inputs) where given."""
    _, _, experts, top_k = MOE_SHAPES[shape]
    rows_per_expert = max(1, tokens * top_k // experts)
    results = []
    for config in MOE_CONFIGS:
        if config.block_m > 16 * rows_per_expert:  # far taller blocks than rows: mostly padding
            continue
        try:
            if layers:
                line, ms = chain_row([moe_case(shape, tokens, x, config) for x in layers], copy, mm)
            else:
                line, ms = row(moe_case(shape, tokens, inputs, config), copy, mm, False)
        except Exception as e:  # more shared memory or registers than the card has, say
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"    skip {tiles_str(config)}: {type(e).__name__}: {first[:100]}", flush=True)
            continue
        results.append((ms, line, config))
    ms, line, config = min(results, key=lambda r: r[0])
    print(f"    best {line}", flush=True)
    return config


def moe_layers(shape: str) -> tuple[MoE, MoE, MoE]:
    """models/deepseek.py's MoE layer at a shape, with random weights, three times: the shared
    experts as a separate MLP (as before the decode fusions), the same weights with them fused
    into the routed experts at every M, and the layer as the model builds it on CUDA (fused up to
    `shared_fused_max_tokens`, an MLP through views of the same rows above; the router's one GEMM)."""
    cfg = shape_config(MOE_MODELS[shape], "bfloat16")
    separate, fused = MoE(cfg, 0, DTYPE, DEV), MoE(cfg, ALWAYS, DTYPE, DEV)
    default = MoE(cfg, shared_fused_max_tokens(cfg, DEV), DTYPE, DEV, router_one_gemm=True)
    for name, p in separate.named_parameters():
        p.normal_(std=p.shape[-1] ** -0.5)
        for layer in (fused, default):  # experts: the first E of E + s; the router cast by copy_
            layer.get_parameter(name).data[: p.shape[0]].copy_(p)
    fused.finish_loading()
    default.finish_loading()
    return separate, fused, default


def shared_rows(shape: str, separate: MoE, fused: MoE, default: MoE, token_counts: list[int]) -> None:
    hidden, shared = separate.cfg.hidden_size, separate.cfg.n_shared_experts
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, dtype=DTYPE, device=DEV)
        separate_ms = bench_ms(lambda x=x: separate(x), graph=True)
        fused_ms = bench_ms(lambda x=x: fused(x), graph=True)
        default_ms = bench_ms(lambda x=x: default(x), graph=True)
        err, default_err = rel_err(fused(x), separate(x)), rel_err(default(x), separate(x))
        print(
            f"moe layer {shape} M={tokens:<5} {shared} shared: separate MLP {separate_ms:8.4f} ms   "
            f"fused {fused_ms:8.4f} ms   {separate_ms / fused_ms:5.2f}x   rel err {err:.1e}   "
            f"default (fused <= {default.fused_max_tokens}) {default_ms:8.4f} ms   "
            f"{separate_ms / default_ms:5.2f}x   rel err {default_err:.1e}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", choices=["mla", "moe"], help="one half only")
    parser.add_argument("--no-ref", action="store_true", help="skip the (slow) PyTorch references")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configs per case")
    parser.add_argument("--moe-m", default=MOE_M, help=f"MoE token counts M (default {MOE_M})")
    parser.add_argument("--out", help="with --sweep: write (merge) the best MoE tiles here as JSON")
    parser.add_argument("--moe-shapes", default=",".join(MOE_SHAPES), help="MoE shapes (default: all)")
    parser.add_argument("--no-layers", action="store_true", help="skip the MoE layer rows (shared experts)")
    parser.add_argument("--mla-cases", default="", help="MLA rows heads:batch:context,... (default: all)")
    parser.add_argument("--chain", type=int, default=0, help="also time L calls back to back")
    parser.add_argument("--mla-no-merge", action="store_true", help="chained MLA rows without the merge too")
    parser.add_argument("--mla-shared-table", action="store_true", help="chained MLA rows over one table too")
    parser.add_argument("--mla-spread", type=float, default=0.0, help="contexts drawn from ctx * (1 -+ S)")
    parser.add_argument(
        "--mla-ceiling", action="store_true", help="with --chain: a copy and a read of as many bytes"
    )
    parser.add_argument(
        "--mla-order", action="store_true", help="with --chain: the chain again, requests longest first"
    )
    args = parser.parse_args()
    args.moe_m = [int(m) for m in args.moe_m.split(",")]
    assert torch.cuda.is_available(), "the benchmark needs a CUDA device"
    torch.manual_seed(0)
    copy, mm = copy_gbps(), matmul_tflops()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    floor = floor_us()
    print(f"device-to-device copy: {copy:.0f} GB/s   bf16 matmul 8192^3: {mm:.0f} TFLOP/s", end="")
    print(f"   floor {floor:.1f} us\n")
    print(f"{'op':<34} {'shape':<30} {'ref ms':>9} {'ms':>9} {'speedup':>9} {'GB/s':>7} {'copy':>7} "
          f"{'TFLOP/s':>7} {'matmul':>7}")  # fmt: skip
    if args.only in (None, "mla"):
        mla_rows(args, copy, mm)
    if args.only in (None, "moe"):
        moe_rows(args, copy, mm)


if __name__ == "__main__":
    main()
