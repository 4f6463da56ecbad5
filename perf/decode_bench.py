"""Decode step time of the real engine path against its memory roofline, on one GPU.

A step is what the engine loop does: schedule -> runner.execute (input prep, CUDA-graph replay or
eager forward, sampling, one host sync) -> update. Its floor is the bytes it must read (weights
plus the KV of every request) over a device-to-device copy bandwidth measured in the same run.
Also reports the CUDA graphs captured and their memory, and the GPU idle share of steady decode
measured with the torch profiler (the CPU overhead the graphs do not hide).

    python perf/decode_bench.py --shape llama3-8b --batches 1,100 --context 1024 --out decode.json

DeepSeek: `--compare-fusions` builds the model twice in the same run, with the decode layer's
launch-saving fusions (`models/deepseek.Fusions`, the default) and without them
(LLA_DEEPSEEK_FUSE=none, the layer as before), and prints the step time of each and their ratio:

    python perf/decode_bench.py --shape deepseek-v2-lite --batches 1,64 --context 1024 --compare-fusions

Tensor parallel (`--tp N`, N GPUs of one host): every rank runs the same steps (the same scheduler,
seeded, on every rank; greedy tokens agree because the ranks' logits are bit-equal), and rank 0
reports its own step time, GPU busy share and kernels; the roofline counts one rank's shards.

    python perf/decode_bench.py --shape llama3-8b --batches 1 --context 1024 --tp 2 --top-kernels 30
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from lightllm_async.config import EngineConfig
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tools.make_random_model import shape_config, write_config_files
from lightllm_async.types import SamplingParams


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / sorted(times[3:])[len(times[3:]) // 2]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fill_batch(runner: ModelRunner, batch: int, context: int, seed: int, spread: float = 0.0) -> Scheduler:
    """A scheduler holding `batch` requests that have prefilled `context` tokens (each drawn from
    context * (1 -+ spread) with a spread) and now decode."""
    sched = Scheduler(
        SchedulerConfig(
            max_running_requests=runner.cfg.max_running_requests,
            max_num_batched_tokens=runner.cfg.max_num_batched_tokens,  # what its input buffers hold
            max_model_len=runner.cfg.max_model_len,
            kv_cache_tokens=runner.num_kv_tokens,
        )
    )
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=runner.cfg.max_model_len, temperature=0.0)
    for i in range(batch):
        vocab = runner.model_cfg.vocab_size
        u = torch.rand((), generator=g).item() if spread else 0.5  # no draw: the prompts as before
        n = int(context * (1 - spread + 2 * spread * u))
        prompt = torch.randint(min(1000, vocab // 2), min(20000, vocab), (max(1, n),), generator=g).tolist()
        sched.add(Request(slot=i, gen=0, prompt_ids=prompt, params=params, arrival=i))
    while True:
        b = sched.schedule()
        sched.update(b, runner.execute(b))
        if b.decode_only and len(b.items) == batch:
            return sched


def _decode_margin(args) -> int:
    """Tokens a request may decode past its prompt: 512 for the timed steps, plus one for each
    prefill step fill_batch takes (1024-token chunks), since the first requests decode while the
    last ones prefill; fewer, and they finish before the batch is full (batch 256 at 2048 did)."""
    batch = max(int(x) for x in args.batches.split(","))
    return 512 + batch * int(args.context * (1 + args.context_spread)) // 1024


def step_times(runner: ModelRunner, sched: Scheduler, steps: int, overlap: bool = True) -> list[float]:
    """Wall time of each engine iteration. With overlap (the engine's loop), step N+1 is scheduled
    and launched before step N's tokens are read."""
    times, inflight = [], None
    for _ in range(steps):
        start = time.perf_counter()
        b = sched.schedule()
        if not overlap:
            sched.update(b, runner.execute(b))
        else:
            launched = (b, runner.launch(b))
            if inflight is not None:
                sched.update(inflight[0], runner.collect(inflight[1]))
            inflight = launched
        times.append(time.perf_counter() - start)
    if inflight is not None:
        sched.update(inflight[0], runner.collect(inflight[1]))
    return times


def gpu_busy_share(
    runner: ModelRunner, sched: Scheduler, steps: int, overlap: bool, top: dict | None = None
) -> float:
    """Union of GPU kernel intervals over wall time, across `steps` steady decode steps; `top`
    receives each kernel name's (µs per step, launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step_times(runner, sched, steps, overlap)
        sync("cuda")
        wall_us = (time.perf_counter() - start) * 1e6
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if top is not None:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us, n = top.get(e.name[:70], (0.0, 0))
                top[e.name[:70]] = (us + (e.time_range.end - e.time_range.start) / steps, n + 1 / steps)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += 0 if cur_e is None else cur_e - cur_s
    return busy / wall_us


def weight_bytes_read(runner: ModelRunner, batch: int) -> float:
    """Weight bytes one decode step of `batch` tokens must read: every parameter, except that an
    untied embedding table gives only its `batch` rows, and of each MoE layer's routed experts
    (stacked [E, ...] tensors named `experts.w13` / `experts.w2`) only those the batch is expected to
    touch, E * (1 - (1 - k/E)^batch) under uniform routing (experts stacked beyond the routed ones,
    the shared experts fused in, are always read)."""
    cfg, total = runner.model_cfg, 0.0
    for name, p in runner.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed.weight" and not cfg.tie_word_embeddings:
            nbytes = batch * p[0].numel() * p.element_size()
        elif name.endswith(("experts.w13", "experts.w2")):
            e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            touched = (p.shape[0] - e) + e * (1 - (1 - k / e) ** batch)
            nbytes *= touched / p.shape[0]
        total += nbytes
    return total


def matmul_rate(device: str) -> float:
    """FLOP/s of a bf16 8192^3 matmul (median of 20), the card's practical compute ceiling."""
    if not device.startswith("cuda"):
        return float("inf")
    a, b = torch.randn(2, 8192, 8192, dtype=torch.bfloat16, device=device)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times[3:])[10]


def gemm_flops(runner: ModelRunner, batch: int) -> float:
    """Matmul FLOPs of one decode step of `batch` tokens: 2 per weight a token multiplies by, every
    matrix but an untied embedding table (read as rows), of each MoE layer's routed experts the
    token's k (and every expert stacked beyond them: the fused shared ones). Attention's products
    (4 * context * head dim a head and layer) are left out: a few percent at batch 256."""
    cfg, total = runner.model_cfg, 0.0
    for name, p in runner.model.named_parameters():
        if p.dim() < 2 or (name == "embed.weight" and not cfg.tie_word_embeddings):
            continue
        per_token = p.numel()
        if name.endswith(("experts.w13", "experts.w2")):
            e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            per_token *= (k + p.shape[0] - e) / p.shape[0]
        total += 2 * batch * per_token
    return total


def measure(
    runner: ModelRunner,
    batch: int,
    context: int,
    bw: float,
    profile_steps: int,
    overlap: bool,
    mm: float,
    spread: float = 0.0,
) -> dict:
    sched = fill_batch(runner, batch, context, seed=batch, spread=spread)
    tokens = sum(len(r.prompt_ids) for r in sched.running)  # the prompts' own lengths
    step_times(runner, sched, 5, overlap)  # warm-up
    t = sorted(step_times(runner, sched, 30, overlap))[15]
    weights = weight_bytes_read(runner, batch)
    kv = (tokens + 20 * batch) * runner.kv_cls.bytes_per_token(runner.model_cfg, runner.kv_dtype)
    roof = (weights + kv) / bw  # bytes a step must read, at the copy's bytes-moved rate
    # and with the matmuls' compute: at batch ~256 a bf16 GEMM is bound by the tensor cores, not
    # by its weights (2 FLOP per weight byte per token against the card's FLOP/byte ridge)
    roof_c = max(weights / bw, gemm_flops(runner, batch) / mm) + kv / bw
    row = {
        "batch": batch,
        "context": context,
        "context_spread": spread,
        "step_ms": t * 1e3,
        "roofline_ms": roof * 1e3,
        "ratio": t / roof,
        "compute_roofline_ms": roof_c * 1e3,
        "ratio_compute": t / roof_c,
        "tokens_per_s": batch / t,
        "graphs": runner.graphs is not None,
        "overlap": overlap,
    }
    if profile_steps:
        top: dict = {}
        row["gpu_busy"] = gpu_busy_share(runner, sched, profile_steps, overlap, top)
        row["kernels_us_per_step"] = sorted(((us, n, k) for k, (us, n) in top.items()), reverse=True)
    for r in list(sched.running):
        sched.abort(r.slot)
    return row


def mixed_profile(runner: ModelRunner, batch: int, context: int, prompt_len: int, steps: int = 8) -> dict:
    """Steps of `batch` decoding requests plus one new `prompt_len`-token prompt each (prefilled in
    that one step, then aborted so the batch stays the same): wall time per step, the GPU's busy
    share, and the kernels that take the most GPU time, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    sched = fill_batch(runner, batch, context, seed=batch)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    vocab = runner.model_cfg.vocab_size

    def one_step(slot: int) -> float:
        prompt = torch.randint(min(1000, vocab // 2), min(20000, vocab), (prompt_len,), generator=g).tolist()
        sched.add(Request(slot=slot, gen=0, prompt_ids=prompt, params=params, arrival=slot))
        sync("cuda")
        start = time.perf_counter()
        b = sched.schedule()
        sched.update(b, runner.execute(b))
        elapsed = time.perf_counter() - start
        sched.abort(slot)
        return elapsed

    for i in range(3):
        one_step(batch + i)  # warm-up (compiles the prefill-shaped kernels)
    times = [one_step(batch + 3 + i) for i in range(steps)]  # timed without the profiler's overhead
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = [one_step(batch + 3 + i) for i in range(steps)]
    kernels: dict[str, list[float]] = {}
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
            kernels.setdefault(e.name[:60], []).append(e.time_range.end - e.time_range.start)
    kernel_ms = sum(end - start for start, end in spans) / steps / 1e3
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]
    for r in list(sched.running):
        sched.abort(r.slot)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "step_ms": sorted(times)[len(times) // 2] * 1e3,
        "profiled_step_ms": sorted(profiled)[len(profiled) // 2] * 1e3,
        "kernel_ms": kernel_ms,  # GPU kernel time per step (overlapping kernels counted twice)
        "top_kernels_ms_per_step": [(name, sum(v) / steps / 1e3, len(v) // steps) for name, v in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,100")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument(
        "--context-spread", type=float, default=0.0, help="each prompt's length drawn from context * (1 -+ S)"
    )
    ap.add_argument("--max-running", type=int, default=128)
    ap.add_argument("--no-graph-baseline", action="store_true", help="also time without CUDA graphs")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument(
        "--compare-fusions",
        action="store_true",
        help="DeepSeek: time the decode fusions on (LLA_DEEPSEEK_FUSE=all) and off (none), same run",
    )
    ap.add_argument("--top-kernels", type=int, default=0, help="print each batch's N costliest kernels")
    ap.add_argument("--out", default="")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8 (the server's flag)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, one GPU each")
    ap.add_argument(
        "--mixed",
        default="",
        help="BATCH,PROMPT: also profile steps of BATCH decodes plus one PROMPT-token prefill",
    )
    args = ap.parse_args()
    if args.tp > 1:
        import torch.multiprocessing as mp

        init = os.path.join(tempfile.mkdtemp(), "rendezvous")
        mp.spawn(run, args=(args, init), nprocs=args.tp)
    else:
        run(0, args, "")


def run(rank: int, args, init: str) -> None:
    from lightllm_async.runner.distributed import leave

    tp_cfg = {}
    if args.tp > 1:
        device = args.device
        if device == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        tp_cfg = dict(tp_size=args.tp, tp_rank=rank, dist_init=f"file://{init}", device=device)
    try:
        report(rank, args, tp_cfg)
    finally:
        leave()


def report(rank: int, args, tp_cfg: dict) -> None:
    from lightllm_async.runner.distributed import init_tensor_parallel

    folder = tempfile.mkdtemp()
    write_config_files(shape_config(args.shape, args.dtype), folder)
    device = tp_cfg.get("device", args.device)
    bw = copy_bandwidth(device, (2 << 30) if args.device == "cuda" else (64 << 20))
    mm = matmul_rate(device)
    tp = None
    rows, graph_info = [], {}
    fusions = ["all", "none"] if args.compare_fusions else [os.environ.get("LLA_DEEPSEEK_FUSE", "all")]
    runs = [(d, f) for f in fusions for d in ([False, True] if args.no_graph_baseline else [False])]
    for disable, fuse in runs:
        os.environ["LLA_DEEPSEEK_FUSE"] = fuse  # read when the runner builds a DeepSeek model
        cfg = EngineConfig(
            model_path=folder,
            device=args.device,
            dtype=args.dtype,
            load_format="random",
            max_model_len=int(args.context * (1 + args.context_spread)) + _decode_margin(args),
            max_running_requests=args.max_running,
            disable_cuda_graph=disable,
            gpu_memory_utilization=0.85,
            kv_cache_dtype=args.kv_cache_dtype,
        ).replace(**tp_cfg)
        if tp is None:
            tp = init_tensor_parallel(cfg)
        runner = ModelRunner(cfg, tp=tp)
        if runner.graphs is not None:
            graph_info = {
                "num_graphs": len(runner.graphs.graphs),
                "memory_mib": runner.graphs.memory_bytes / 2**20,
                "largest_mib": runner.graphs.largest_graph_bytes / 2**20,
            }
        for b in (int(x) for x in args.batches.split(",")):
            profile = 20 if args.device == "cuda" and not disable else 0
            for overlap in (True, False):
                row = measure(runner, b, args.context, bw, profile, overlap, mm, args.context_spread)
                rows.append({**row, "fusions": fuse})
                if runner.step_times is not None:  # LLA_STEP_TIMING=1
                    print(f"rank {rank} batch {b} overlap {overlap}{runner.step_times.summary()}", flush=True)
        if args.mixed and args.device == "cuda" and not disable:
            mb, mp = (int(x) for x in args.mixed.split(","))
            pieces = runner.piecewise
            # the same steps with the piecewise graphs (if captured), then run eagerly
            for label in ("piecewise graphs", "eager") if pieces is not None else ("eager",):
                runner.piecewise = pieces if label != "eager" else None
                mixed = mixed_profile(runner, mb, args.context, mp)
                graph_info["mixed" if label == "eager" else "mixed_piecewise"] = mixed
                print(
                    f"\nmixed step ({label}): {mb} decodes + one {mp}-token prefill: "
                    f"{mixed['step_ms']:.2f} ms ({mixed['profiled_step_ms']:.2f} ms profiled), "
                    f"GPU kernels {mixed['kernel_ms']:.2f} ms"
                )
                for name, ms, count in mixed["top_kernels_ms_per_step"]:
                    print(f"  {ms:8.3f} ms {count:5d}x  {name}")
            runner.piecewise = pieces
        del runner
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if rank:
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.tp > 1:
        name += f" x{args.tp}, tensor parallel: rank 0's figures"
    summary = {
        "device": name,
        "copy_bw_GBps": bw / 1e9,
        "matmul_tflops": mm / 1e12,
        "shape": args.shape,
        "dtype": args.dtype,
        "graphs": graph_info,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(
        f"\n{summary['device']}  {args.shape} {args.dtype}  copy bandwidth {bw / 1e9:.0f} GB/s, "
        f"bf16 matmul {mm / 1e12:.0f} TFLOP/s (roof2: the matmuls' bytes or FLOPs, whichever is slower, "
        "plus the KV bytes)"
    )
    print(f"graphs {graph_info}")
    cols = ["batch", "graphs", "overlap", "step ms", "roof ms", "x roof", "roof2 ms", "x roof2", "tok/s"]
    cols += ["GPU busy", "fusions"]
    print("".join(f"{c:>9}" for c in cols))
    for r in rows:
        busy = f"{r['gpu_busy']:.1%}" if "gpu_busy" in r else "-"
        vals = [
            r["batch"],
            r["graphs"],
            r["overlap"],
            f"{r['step_ms']:.2f}",
            f"{r['roofline_ms']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['compute_roofline_ms']:.2f}",
            f"{r['ratio_compute']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            busy,
            r["fusions"],
        ]
        print("".join(f"{str(v):>9}" for v in vals))
    if args.compare_fusions:
        print_fusion_ratios(rows)
    for r in [r for r in rows if r["overlap"] and "kernels_us_per_step" in r] if args.top_kernels else []:
        kernels = r["kernels_us_per_step"]
        total = sum(us for us, _, _ in kernels)
        print(
            f"\nkernels of the batch-{r['batch']} step ({r['fusions']}): {total:.0f} µs, "
            f"{sum(n for _, n, _ in kernels):.0f} launches a step; top {args.top_kernels}:"
        )
        for us, n, name in kernels[: args.top_kernels]:
            print(f"  {us:8.1f} µs  {n:5.0f}x  {name}")


def print_fusion_ratios(rows: list[dict]) -> None:
    """Step time with the fusions over without, per batch (graphs and overlap as measured)."""
    by = {(r["batch"], r["graphs"], r["overlap"], r["fusions"]): r["step_ms"] for r in rows}
    print("\nfusions on / off (step ms):")
    for (batch, graphs, overlap, fuse), on in by.items():
        off = by.get((batch, graphs, overlap, "none"))
        if fuse == "all" and off:
            print(
                f"  batch {batch:>4} graphs {graphs!s:>5} overlap {overlap!s:>5}: "
                f"{on:.3f} / {off:.3f} ms = {on / off:.3f}"
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
