"""Tensor parallelism on CUDA (issue 13, the model half): the variants of
tests/test_tensor_parallel.py sharded over 2 GPUs (NCCL, the Triton kernels) against the whole model
on one GPU, in float32 and bfloat16, through prefill, a mixed step and decodes; then one decode step
of each family captured in a CUDA graph with its NCCL collectives and replayed, against eager.

    device run (kind nvidia-h200-x2, carry .whl): python3 perf/tp_gpu_check.py

Prints one row per variant and dtype (max |logit difference| / max |logit|, greedy tokens equal,
ranks' logits bit-equal) and one per graph check; exits 1 if a check fails.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from lightllm_async.layers.parallel import SINGLE, TPGroup  # noqa: E402
from test_tensor_parallel import STEPS, VARIANTS, _ctx, build, run_steps  # noqa: E402

WORLD = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRAPH_VARIANTS = ["llama", "deepseek-v3-vocab-511"]


def graph_replay_equals_eager(name: str, tp: TPGroup, device: str) -> bool:
    """Prefill three requests, then one decode step eager and the same step captured in a CUDA
    graph (NCCL collectives inside) and replayed: the same logits bits."""
    model, kv = build(name, tp, device, torch.bfloat16)
    prefill = STEPS[0]
    ids = torch.randint(
        3, model.cfg.vocab_size, (sum(n for *_, n in prefill),), generator=torch.Generator().manual_seed(1)
    )
    model(ids.to(device), _ctx(prefill, device), kv)
    decode = [(r, c + n, 1) for r, c, n in prefill]
    ids, ctx = torch.tensor([5, 6, 7], device=device), _ctx(decode, device)
    eager = model(ids, ctx, kv).clone()  # rewrites the same k/v rows every time: idempotent
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(ids, ctx, kv)  # warm-up off the capture, as DecodeGraphs does
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids, ctx, kv)
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(out, eager)


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        device_id=torch.device("cuda", rank),
    )
    try:
        tp = TPGroup(rank, WORLD, dist.group.WORLD)
        device = f"cuda:{rank}"
        results = {
            (name, d): run_steps(name, tp, device, dtype) for d, dtype in DTYPES.items() for name in VARIANTS
        }
        graphs = {name: graph_replay_equals_eager(name, tp, device) for name in GRAPH_VARIANTS}
        torch.save({"steps": results, "graphs": graphs}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> int:
    out = tempfile.mkdtemp()
    mp.spawn(rank_main, args=(os.path.join(out, "rendezvous"), out), nprocs=WORLD)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    ok = True
    print(
        f"{'variant':28} {'dtype':9} {'max|diff|/max|ref|':>18} {'greedy equal':>12} {'ranks bit-equal':>15}"
    )
    for (name, d), (logits, tokens) in ranks[0]["steps"].items():
        want_logits, want_tokens = run_steps(name, SINGLE, "cuda:0", DTYPES[d])
        rel = max(
            ((g - w).abs().max() / w.abs().max()).item() for g, w in zip(logits, want_logits, strict=True)
        )
        same = all(torch.equal(a, b) for a, b in zip(logits, ranks[1]["steps"][name, d][0], strict=True))
        greedy = tokens == want_tokens
        ok &= same and (d != "float32" or (greedy and rel < 1e-3))
        print(f"{name:28} {d:9} {rel:18.2e} {greedy!s:>12} {same!s:>15}")
    for name in GRAPH_VARIANTS:
        replayed = all(r["graphs"][name] for r in ranks)
        ok &= replayed
        print(f"graph replay == eager, {name}, bfloat16, both ranks: {replayed}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
