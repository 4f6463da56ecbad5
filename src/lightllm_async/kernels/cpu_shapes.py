"""Few distinct shapes for torch's 16-bit CPU kernels, so that a long-running CPU server's memory
stays bounded.

On the CPU, bfloat16 (and float16) `F.linear` and `scaled_dot_product_attention` run through
oneDNN, which keeps per-shape state (primitives, JIT-compiled GEMM kernels) that is never given
back. Measured with torch 2.13 on this project's CPU machine (perf/RESULTS.md, 2026-12-01): four
bfloat16 projections at 1,500 row counts drawn from 1-2048 grew a process from ~200 MB to 2.0 GB
and still growing, SDPA at as many lengths to 863 MB; float32 (MKL), or one repeated shape, stays
flat. Every prompt length was a new shape, so the engine grew with its traffic. Rounding the row
count up to one of a few sizes (`bucket`: 8 a doubling, at most 12.5% more rows; 16 for
attention) bounds that state; padding rows are zeros whose results are dropped. The engine then
levels off (perf/cpu_memory_bench.py: ~785 MB, against 1,156 MB and climbing after 150 rounds);
a prompt at a length whose kernels exist already prefills 2-7% slower (90-1,800 tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN_DTYPES = (torch.bfloat16, torch.float16)


def bucket(n: int, fine: bool = False) -> int:
    """n itself up to 16 (few sizes already), else n rounded up to one of 8 sizes a doubling (at
    most 12.5% more), or with `fine` 16 (6.25%: attention, whose causal work grows with the square
    of the count)."""
    if n <= 16:
        return n
    shift = max(0, n.bit_length() - (5 if fine else 4))
    return -(-n >> shift) << shift


def bounded(x: Tensor) -> bool:
    """Whether x goes through a per-shape oneDNN kernel here: a 16-bit CPU tensor."""
    return x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """x [n, ...] with zero rows appended up to `rows`."""
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))]) if rows > x.shape[0] else x


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with a 16-bit CPU input's rows (its leading dims flattened) padded to `bucket`."""
    if not bounded(x):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    y = F.linear(pad_rows(flat, bucket(n)), weight, bias)[:n]
    return y.reshape(*x.shape[:-1], y.shape[-1])
