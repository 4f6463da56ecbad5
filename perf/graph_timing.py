"""Microseconds per call of a captured CUDA graph, by the device's own clock (the perf scripts' one
way of timing a graph of back-to-back calls)."""

from __future__ import annotations

import torch


def replay_us(graph: torch.cuda.CUDAGraph, calls: int, reps: int) -> float:
    """The median over `reps` replays of `graph` (holding `calls` calls) of its time per call."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[reps // 2]
