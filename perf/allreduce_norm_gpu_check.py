"""The fused all-reduce + residual add + RMSNorm (kernels/allreduce_norm.py) on 2 GPUs of one host:
correctness, CUDA graphs, the model through it, and its time against the unfused paths.

    device run (kind nvidia-h200-x2, carry .whl): python3 perf/allreduce_norm_gpu_check.py

(a) bf16 and fp32, hidden 4096 and 4000, 200 calls back to back with fresh inputs, the rows
    cycling through 1, 3, 64, 100, 257 (so the row slots' buffer halves drift apart), rank 1 now
    and then delayed (torch.cuda._sleep) so that the ranks run skewed; every call against the
    reference (residual_out bit-exact, out within tolerance), both ranks' outputs bit-equal.
(b) two CUDA graphs, of 32 and of 31 calls (an odd count: consecutive replays start on the
    other halves), replayed interleaved with new inputs before each replay, against the reference.
(c) Llama (tests' tiny variant) with the runner's collectives (`with_small_all_reduce`): logits
    against NCCL-only TP, ranks bit-equal, and a decode step in a CUDA graph against eager.
(a') the all-reduce alone (`sum`) over the same buffers, interleaved with fused calls.
(d) microseconds per call, rows 1 to 100, hidden 4096, bf16, each in a CUDA graph of 100 calls:
    fused; torch's one_shot_all_reduce_copy_out + rms_norm (the unfused path); NCCL + rms_norm;
    the sums alone, ours and torch's one-shot.

Prints one line per check and a timing table; exits 1 if a check fails, 2 if a rank crashed or
the ranks did not finish within 150 s (they are killed then).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from graph_timing import replay_us

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

WORLD, EPS = 2, 1e-5
TIMEOUT_S = int(os.environ.get("CHECK_TIMEOUT_S", "150"))
ROWS = [1, 3, 64, 100, 257]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(seed: int, rows: int, hidden: int, dtype, device):
    """Every rank's partial, the residual and the weight of one call: the same on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    partials = torch.randn(WORLD, rows, hidden, generator=g, device=device).to(dtype)
    residual = torch.randn(rows, hidden, generator=g, device=device).to(dtype)
    weight = torch.randn(hidden, generator=g, device=device).to(dtype)
    return partials, residual, weight


def check_call(out, res, partials, residual, weight, dtype, what: str, fails: list) -> None:
    from lightllm_async.kernels.allreduce_norm import allreduce_add_rms_norm_ref

    ref_out, ref_res = allreduce_add_rms_norm_ref(list(partials), residual, weight, EPS)
    if not torch.equal(res, ref_res):
        fails.append(
            f"{what}: residual_out differs from the reference in {(res != ref_res).sum().item()} elements"
        )
    if out.isnan().any() or rel(out, ref_out) >= TOL[dtype]:
        fails.append(f"{what}: out rel err {rel(out, ref_out):.2e}")


def ranks_bit_equal(tensors: list[torch.Tensor], group) -> bool:
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).cuda()
    both = flat.new_empty(WORLD * flat.numel())
    dist.all_gather_into_tensor(both, flat, group=group)
    return torch.equal(both[: flat.numel()], both[flat.numel() :])


def many_calls(op, dtype, hidden, device, group, lines, fails) -> None:
    rank, outs, calls = dist.get_rank(), [], []
    for i in range(200):
        calls.append(inputs(1000 * i + hidden, ROWS[i % len(ROWS)], hidden, dtype, device))
    torch.cuda.synchronize()
    dist.barrier(group)
    for i, (partials, residual, weight) in enumerate(calls):  # no host sync in between
        if rank == 1 and i % 7 == 3:
            torch.cuda._sleep(20000 * (i % 5 + 1))  # rank 0 runs ahead, then waits
        outs.append(op(partials[rank], residual, weight, EPS))
    torch.cuda.synchronize()
    before = len(fails)
    for i, ((out, res), (partials, residual, weight)) in enumerate(zip(outs, calls, strict=True)):
        check_call(out, res, partials, residual, weight, dtype, f"call {i} {dtype} N={hidden}", fails)
    same = ranks_bit_equal([t for pair in outs for t in pair], group)
    if not same:
        fails.append(f"{dtype} N={hidden}: the ranks' outputs differ")
    lines.append(
        f"(a) 200 calls {str(dtype):14} N={hidden}: reference {len(fails) == before}, ranks bit-equal {same}"
    )


def graph_calls(op, device, group, lines, fails) -> None:
    dtype, hidden, rank = torch.bfloat16, 4096, dist.get_rank()
    graphs = []
    for count in (32, 31):
        static = [inputs(i, ROWS[i % len(ROWS)], hidden, dtype, device) for i in range(count)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [op(p[rank], r, w, EPS) for p, r, w in static]
        graphs.append((graph, static, outs))
    before = len(fails)
    for replay, which in enumerate([0, 1, 1, 0, 1, 0, 0, 1]):
        graph, static, outs = graphs[which]
        for i, (p, r, w) in enumerate(static):  # new values in the captured inputs
            fresh = inputs(7919 * replay + i, p.shape[1], hidden, dtype, device)
            p.copy_(fresh[0]), r.copy_(fresh[1]), w.copy_(fresh[2])
        graph.replay()
        if replay % 2:  # a sync only after every second replay: replays also run back to back
            torch.cuda.synchronize()
            for i, ((out, res), (p, r, w)) in enumerate(zip(outs, static, strict=True)):
                check_call(out, res, p, r, w, dtype, f"graph replay {replay} call {i}", fails)
    torch.cuda.synchronize()
    same = ranks_bit_equal([t for _, _, outs in graphs for pair in outs for t in pair], group)
    if not same:
        fails.append("graphs: the ranks' outputs differ")
    lines.append(
        f"(b) graphs of 32 and 31 calls, 8 replays: reference {len(fails) == before}, ranks bit-equal {same}"
    )


def model_check(device, group, lines, fails) -> None:
    from tp_gpu_check import graph_replay_equals_eager

    from lightllm_async.layers.parallel import TPGroup
    from lightllm_async.runner.distributed import with_small_all_reduce
    from test_tensor_parallel import _variant, run_steps

    plain = TPGroup(dist.get_rank(), WORLD, group)
    hidden = _variant("llama")[0].hidden_size
    for dtype in (torch.float32, torch.bfloat16):
        tp = with_small_all_reduce(plain, dtype, torch.device(device), 1, hidden)
        if tp.fused is None:
            fails.append(f"model {dtype}: the fused kernel was not set up")
            continue
        logits, tokens = run_steps("llama", tp, device, dtype)
        want_logits, want_tokens = run_steps("llama", plain, device, dtype)
        diff = max(
            ((g - w).abs().max() / w.abs().max()).item() for g, w in zip(logits, want_logits, strict=True)
        )
        same = ranks_bit_equal(logits, group)
        ok = same and (dtype != torch.float32 or (tokens == want_tokens and diff < 1e-3))
        if not ok:
            fails.append(
                f"model {dtype}: diff {diff:.2e}, greedy equal {tokens == want_tokens}, ranks {same}"
            )
        lines.append(
            f"(c) llama {str(dtype):14} fused vs NCCL-only TP: max|diff|/max {diff:.2e}, greedy equal "
            f"{tokens == want_tokens}, ranks bit-equal {same}"
        )
        if dtype == torch.bfloat16:
            replayed = graph_replay_equals_eager("llama", tp, device)
            if not replayed:
                fails.append("model graph replay != eager")
            lines.append(f"(c) llama bf16 decode step in a CUDA graph == eager: {replayed}")


def time_graph(fn, group) -> float:
    """Microseconds per call of `fn`, 100 calls captured in a CUDA graph, the median of 5 replays."""
    fn()  # warm up (compiles), outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier(group)
    return replay_us(graph, 100, 5)


TIMED_ROWS = (1, 8, 16, 32, 100)


def timings(fused, device, group) -> dict:
    from lightllm_async.kernels import rms_norm
    from lightllm_async.layers.parallel import SymmetricAllReduce

    dtype, hidden = torch.bfloat16, 4096
    small = SymmetricAllReduce.create(group, dtype, device, 4 << 20)
    result = {}
    for rows in TIMED_ROWS:
        x = torch.randn(rows, hidden, device=device).to(dtype)
        residual, weight = torch.randn_like(x), torch.randn(hidden, device=device).to(dtype)
        result["fused", rows] = time_graph(lambda x=x, r=residual, w=weight: fused(x, r, w, EPS), group)
        result["fused, sum only", rows] = time_graph(lambda x=x: fused.sum(x), group)
        if small is not None:
            result["one-shot + rms_norm", rows] = time_graph(
                lambda x=x, r=residual, w=weight: rms_norm(small(x), w, EPS, r), group
            )
            result["one-shot, sum only", rows] = time_graph(lambda x=x: small(x), group)

        def nccl(x=x, r=residual, w=weight):
            y = x.clone()
            dist.all_reduce(y, group=group)
            return rms_norm(y, w, EPS, r)

        result["NCCL + rms_norm", rows] = time_graph(nccl, group)
    return result


def sum_calls(op, device, group, lines, fails) -> None:
    """The all-reduce alone over the same buffers, interleaved with fused calls: the sums exact."""
    from lightllm_async.kernels.allreduce_norm import allreduce_add_rms_norm_ref

    rank, before, outs = dist.get_rank(), len(fails), []
    calls = [inputs(77 * i, ROWS[i % len(ROWS)], 4096, torch.bfloat16, device) for i in range(60)]
    for i, (partials, residual, weight) in enumerate(calls):
        if i % 3 == 1:
            outs.append(op(partials[rank], residual, weight, EPS)[1])
        else:
            outs.append(op.sum(partials[rank]))
    torch.cuda.synchronize()
    for i, (got, (partials, residual, weight)) in enumerate(zip(outs, calls, strict=True)):
        want = allreduce_add_rms_norm_ref(list(partials), residual if i % 3 == 1 else None, weight, EPS)[1]
        if not torch.equal(got, want):
            fails.append(f"sum call {i}: differs from the reference in {(got != want).sum().item()} elements")
    same = ranks_bit_equal(outs, group)
    if not same:
        fails.append("sums: the ranks' outputs differ")
    ok = len(fails) == before
    lines.append(f"(a') 60 calls, sums alone among fused calls: reference {ok}, ranks bit-equal {same}")


def rank_main(rank: int, port: int, out_dir: str) -> None:
    from lightllm_async.layers.parallel import FusedAllReduceNorm

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, device_id=device
    )
    group, lines, fails, times = dist.group.WORLD, [], [], {}

    def save():  # after each part, so that a hang or a timeout still reports the parts before
        torch.save({"lines": lines, "fails": fails, "times": times}, os.path.join(out_dir, f"rank{rank}.pt"))

    try:
        ops = {}
        for dtype in (torch.bfloat16, torch.float32):
            for hidden in (4096, 4000):
                op = ops[dtype, hidden] = FusedAllReduceNorm.create(group, dtype, device, hidden, 512)
                if op is None:
                    fails.append(f"FusedAllReduceNorm.create gave None for {dtype} N={hidden} (see the log)")
                    continue
                many_calls(op, dtype, hidden, device, group, lines, fails)
                save()
        if ops[torch.bfloat16, 4096] is not None:
            sum_calls(ops[torch.bfloat16, 4096], device, group, lines, fails)
            save()
        if ops[torch.bfloat16, 4096] is not None:
            graph_calls(ops[torch.bfloat16, 4096], device, group, lines, fails)
            save()
            times.update(timings(ops[torch.bfloat16, 4096], device, group))
            save()
            model_check(str(device), group, lines, fails)
    except Exception as exc:  # noqa: BLE001 - reported, then the parent fails
        import traceback

        fails.append(f"rank {rank} raised: {exc!r}\n{traceback.format_exc()}")
    lines.append("done")
    save()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_report(path: str) -> dict:
    try:
        return torch.load(path)
    except Exception:  # noqa: BLE001 - not written yet, or cut short by a kill
        return {"lines": [], "fails": [], "times": {}}


def main() -> int:
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast hangs on these hosts
    out = tempfile.mkdtemp()
    start = time.monotonic()
    ctx = mp.spawn(rank_main, args=(free_port(), out), nprocs=WORLD, join=False)
    status = 0
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() - start > TIMEOUT_S:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                print(f"TIMEOUT: the ranks did not finish within {TIMEOUT_S} s (killed): a hang? So far:")
                status = 2
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        print(f"a rank crashed: {exc}\nSo far:")
        status = 2
    paths = [os.path.join(out, f"rank{r}.pt") for r in range(WORLD)]
    reports = [load_report(p) for p in paths]
    for line in reports[0]["lines"]:
        print(line)
    fails = [f for r in reports for f in r["fails"]]
    for f in fails[:20]:
        print("FAIL", f)
    times = reports[0]["times"]
    if times:
        head = "".join(f"{'rows=' + str(r):>9}" for r in TIMED_ROWS)
        print(f"\n{'us per call, bf16, N=4096, in a graph':40}{head}")
        names = ("fused", "one-shot + rms_norm", "NCCL + rms_norm", "fused, sum only", "one-shot, sum only")
        for name in names:
            if (name, 1) in times:
                print(f"{name:40}" + "".join(f"{times[name, r]:9.2f}" for r in TIMED_ROWS))
    verdict = "INCOMPLETE" if status else "PASS" if not fails else f"FAILED ({len(fails)} failures)"
    print(f"\n{verdict} in {time.monotonic() - start:.0f} s")
    return status or (1 if fails else 0)


if __name__ == "__main__":
    sys.exit(main())
