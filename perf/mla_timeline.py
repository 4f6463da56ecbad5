"""Where an MLA decode call's time goes, program by program (issue 9: the ~17 us a 16-head call
pays beyond the bytes it moves, which a copy of the same bytes does not; perf/RESULTS.md).

    python perf/mla_timeline.py [--cases 16:64:1024,16:128:1024,16:64:4096] [--chain 4] [--replays 30]

The split kernel and the chunk merge are recompiled from their own source with clock reads added
(`%globaltimer`, ns): when a program became resident (before its PDL wait), when its wait
returned, when (in the split kernel) its first tile was done and its tile loop was, and when it
ended, with the SM it ran on. The calls run as `perf/mla_moe_bench.py
--chain` runs them: L calls over distinct caches captured in one CUDA graph, L2 flushed before each
replay. Per launch of the chain (the median replay by span) it prints, in us from the chain's first
program: when the launch's programs became resident and got past their wait (first, last), how long
a program ran after its wait (p10, p50, p90, max), when they ended (p50, p90, last), the SMs
used and the most programs an SM ran; for the split kernel also how long a program took to its
first tile's end, the rest of its loop, and after the loop (the result's store). The probes add a
few instructions and six stores a program; the chain's time is printed beside the uninstrumented
one's (bench_ms) to show what they cost.

Needs a CUDA device (the clock reads are PTX). Bench-only: the kernels' source is transformed as
text; `tests/test_bench_ceiling.py` checks that the transform still finds what it probes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re
import sys
import tempfile
import textwrap

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import bench_ms  # noqa: E402  (also puts src/ on the path)

MODULE = "lightllm_async.kernels.mla_decode_attention"
PROBED = ("_mla_decode_split_kernel", "_mla_decode_merge_kernel", "_mla_decode_merge_pair_kernel")
WORDS = 6  # int64 words a program writes: resident, past its wait, first tile done, loop done, end, SM
LOOP = r"^    for n in range\("  # the split kernel's tile loop: its first tile and its end are timed too
LOOP_LAST = r"^        m_i = m_new$"  # the loop body's last line
AFTER_LOOP = r"^    # -- the chunk's result"

HEADER = f'''
import importlib

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer, smid

_kernels = importlib.import_module("{MODULE}")  # (`import ... as` would bind the package's function)

globals().update({{k: v for k, v in vars(_kernels).items() if not k.startswith("__")}})


@triton.jit
def _probe_record(TIMES, t0, t1, t_first, t_loop):
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    base = TIMES + pid.to(tl.int64) * {WORDS}
    tl.store(base, t0)
    tl.store(base + 1, t1)
    tl.store(base + 2, t_first)
    tl.store(base + 3, t_loop)
    tl.store(base + 4, globaltimer())
    tl.store(base + 5, smid().to(tl.int64))
'''


def probed_source(fn) -> str:
    """A @triton.jit kernel's source with the probes: a TIMES pointer after its parameters, the
    clock read at entry and after `pdl_wait`, and the record before every return and at the end;
    in a kernel with the split kernel's tile loop (LOOP), also when its first tile is done and when
    the loop is (where neither is read, the wait's time stands in)."""
    src = textwrap.dedent(inspect.getsource(fn))
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def "))
    close = next(i for i in range(start, len(lines)) if re.match(r"^\):", lines[i]))
    looped = any(re.match(LOOP, line) for line in lines)
    early, final = "_probe_record(TIMES, _t0, _t1, _t1, _t1)", "_probe_record(TIMES, _t0, _t1, _tf, _tl)"
    body = []
    for line in lines[close + 1 :]:
        if re.match(r"^\s+return\s*$", line):
            indent = line[: len(line) - len(line.lstrip())]
            body.append(f"{indent}{early}")
        if looped and re.match(LOOP, line):
            body.append("    _tf = _t1")
        if looped and re.match(AFTER_LOOP, line):
            body.append("    _tl = globaltimer()")
        body.append(line)
        if re.match(r"^    pdl_wait\(", line):
            body.append("    _t1 = globaltimer()")
        if looped and re.match(LOOP_LAST, line):
            body.append("        _tf = tl.where(n == start, globaltimer(), _tf)")
    assert any("_t1 = globaltimer()" in line for line in body), f"{fn.__name__}: no pdl_wait to probe"
    if looped:
        assert sum("_tf" in line or "_tl =" in line for line in body) == 3, f"{fn.__name__}: the loop moved"
    return "\n".join(
        ["@triton.jit", *lines[start:close], "    TIMES,", lines[close], "    _t0 = globaltimer()", *body,
         f"    {final if looped else early}", ""]
    )  # fmt: skip


def probed_module():
    """The module of probed kernels, written to a file (Triton reads a kernel's source from it)."""
    kernels = importlib.import_module(MODULE)
    text = HEADER + "\n\n" + "\n\n".join(probed_source(getattr(kernels, name).fn) for name in PROBED)
    path = os.path.join(tempfile.mkdtemp(prefix="mla_probe_"), "mla_probed.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("mla_probed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mla_probed"] = module
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Hands each probed launch its own run of the TIMES buffer and logs the launches in order."""

    def __init__(self, words: int, device: str):
        self.buf = torch.zeros(words, dtype=torch.int64, device=device)
        self.used, self.log = 0, []

    def reset(self) -> None:
        self.used, self.log = 0, []

    def take(self, name: str, programs: int) -> torch.Tensor:
        assert self.used + programs * WORDS <= self.buf.numel(), "TIMES buffer too small"
        view = self.buf[self.used :]
        self.log.append((name, self.used, programs))
        self.used += programs * WORDS
        return view


class Probe:
    """Stands in for one kernel of MODULE: launches its probed twin with a run of the buffer."""

    def __init__(self, name: str, kernel, recorder: Recorder):
        self.name, self.kernel, self.recorder = name, kernel, recorder

    def __getitem__(self, grid):
        programs = 1
        for n in grid:
            programs *= n

        def launch(*args, **kwargs):
            times = self.recorder.take(self.name, programs)
            return self.kernel[grid](*args, TIMES=times, **kwargs)

        return launch


def launch_stats(rows: torch.Tensor, origin: int) -> str:
    """One launch's line: rows [programs, WORDS] of int64 ns (and SM), relative to origin."""
    t0, t1, tf, tl, t2 = ((rows[:, i] - origin).double() / 1e3 for i in range(5))
    sm = rows[:, 5]
    work = (t2 - t1).sort().values
    ends = t2.sort().values

    def q(x, p):
        x = x.sort().values
        return x[min(len(x) - 1, int(p * len(x)))].item()

    per_sm = torch.bincount(sm).max().item()
    line = (
        f"resident {t0.min():6.1f}..{t0.max():6.1f}  past wait {t1.min():6.1f}..{t1.max():6.1f}  "
        f"run p10/50/90/max {q(work, 0.1):5.1f} {q(work, 0.5):5.1f} {q(work, 0.9):5.1f} {work.max():5.1f}  "
        f"end p50/90/last {q(ends, 0.5):6.1f} {q(ends, 0.9):6.1f} {ends.max():6.1f}  "
        f"SMs {len(torch.unique(sm))} (<= {per_sm} programs)"
    )
    looped = tl > t1
    if looped.any():  # where the tile loop ran: to its first tile, the rest of it, and after it (p50s)
        first, loop, after = (tf - t1)[looped], (tl - tf)[looped], (t2 - tl)[looped]
        line += (
            f"  | first tile p10/50/90 {q(first, 0.1):5.1f} {q(first, 0.5):5.1f} {q(first, 0.9):5.1f}"
            f"  rest of loop p50 {q(loop, 0.5):5.1f}"
            f"  after it p50/max {q(after, 0.5):4.1f} {after.max():4.1f}"
        )
    return line


def spans(buf: torch.Tensor, log: list) -> list[tuple[str, torch.Tensor]]:
    """The chain's launches from one replay's buffer: (kernel name, rows [programs, WORDS])."""
    return [(name, buf[off : off + n * WORDS].view(n, WORDS)) for name, off, n in log]


def chain_span(launches: list) -> int:
    return int(max(rows[:, 2].max() for _, rows in launches) - min(rows[:, 0].min() for _, rows in launches))


def timeline(bench, kernels, probed, heads: int, batch: int, ctx: int, chain: int, replays: int) -> None:
    layers = [bench.mla_inputs(batch, ctx, heads) for _ in range(chain)]

    def calls():
        return [bench.K.mla_decode_attention(*x) for x in layers]

    plain_ms = bench_ms(calls, graph=True)
    recorder = Recorder(WORDS * 4 * batch * heads * 64, "cuda")
    saved = {name: getattr(kernels, name) for name in PROBED}
    try:
        for name in PROBED:
            setattr(kernels, name, Probe(name, getattr(probed, name), recorder))
        probed_ms = bench_ms(calls, graph=True)  # (also compiles the probed kernels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        recorder.reset()
        with torch.cuda.graph(graph):
            calls()
    finally:
        for name, kernel in saved.items():
            setattr(kernels, name, kernel)
    flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    runs = []
    for _ in range(replays):
        flush.zero_()
        recorder.buf.zero_()
        graph.replay()
        torch.cuda.synchronize()
        runs.append(spans(recorder.buf.cpu(), recorder.log))
    runs.sort(key=chain_span)
    launches = runs[len(runs) // 2]
    origin = int(min(rows[:, 0].min() for _, rows in launches))
    clock = torch.unique(torch.cat([rows[:, :3].flatten() for _, rows in launches]))
    tick = int(clock.diff().min()) if clock.numel() > 1 else 0  # the clock's resolution, at most
    print(
        f"\nH={heads} B={batch} ctx={ctx}, x{chain} chained: {plain_ms * 1e3 / chain:.1f} us a call plain, "
        f"{probed_ms * 1e3 / chain:.1f} probed; the median replay spans {chain_span(launches) / 1e3:.1f} us; "
        f"clock readings {tick} ns apart at the least"
    )
    for i, (name, rows) in enumerate(launches):
        short = name.replace("_mla_decode_", "").replace("_kernel", "")
        print(f"  {i:2d} {short:<11} {rows.shape[0]:5d} programs  {launch_stats(rows, origin)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="16:64:1024,16:128:1024,16:64:4096", help="heads:batch:context,...")
    ap.add_argument("--chain", type=int, default=4, help="calls over distinct caches in one graph")
    ap.add_argument("--replays", type=int, default=30)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "the probes read the GPU's clock: a CUDA device is needed"
    bench = importlib.import_module("mla_moe_bench")  # its inputs, as the bench times them
    kernels, probed = importlib.import_module(MODULE), probed_module()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    for case in args.cases.split(","):
        heads, batch, ctx = (int(v) for v in case.split(":"))
        timeline(bench, kernels, probed, heads, batch, ctx, args.chain, args.replays)


if __name__ == "__main__":
    main()
