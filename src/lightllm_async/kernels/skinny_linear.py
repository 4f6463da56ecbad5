"""y = x W^T for a few rows of x: the decode step's projections at small batch.

At batch 1-8 a projection reads its whole weight to produce a few rows, so its time is the bytes
over the card's bandwidth plus what it costs to get going. Alone, this kernel and cuBLAS are
within ~10% of each other at the decode shapes (perf/RESULTS.md). In the step it wins where it
can start early: it is launched with programmatic dependent launch (Hopper; `backend.pdl`), so
its programs are resident and have read their first weight tile while the kernel before them
(an RMSNorm, or under tensor parallelism the all-reduce waiting on NVLink) still runs, and only
then wait for it and read x. cuBLAS's kernels cannot be launched that way, and at these shapes
they add a split-K reduce launch. Each program gives a narrow slice of output columns (16-64)
and streams their weight rows once along K, the few rows of x padded to one 16-row tensor-core
tile. `linear` routes the shapes where this measured faster (`routed`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_shapes
from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton

MAX_ROWS = 8  # rows of x up to which `linear` routes CUDA projections here (see linear)


def skinny_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, out_dtype=None) -> Tensor:
    # reads the weight once: N * K * itemsize, the few rows of x and y besides
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(out_dtype or x.dtype)


@jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    X,  # [M, K] rows of x, the last dim contiguous
    W,  # [N, K] the weight, rows contiguous
    B,  # [N] bias (unused unless HAS_BIAS)
    Y,  # [M, N] out, rows contiguous
    M, N, K,
    stride_x, stride_w, stride_y,  # row strides
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" (float32 products) off CUDA and for float32
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch): the first weight tile before gdc_wait
    BLOCK_M: tl.constexpr,  # >= M, >= 16: one tensor-core tile of rows
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # K per iteration
):  # fmt: skip
    # one program: BLOCK_N output columns of every row; its weight rows streamed once along K
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_x + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :]

    # the first K tile: its weight does not depend on the kernel before, so under programmatic
    # dependent launch it is read while that kernel finishes; x only after it has
    w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    pdl_wait(PDL)
    x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    if PRECISION == "ieee":  # float32, or the interpreter (whose 16-bit tl.dot is wrong)
        x, w = x.to(tl.float32), w.to(tl.float32)
    acc = tl.dot(x, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), input_precision=PRECISION)
    for k in range(BLOCK_K, K, BLOCK_K):
        mask_k = offs_k < K - k
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if PRECISION == "ieee":
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# the best tiles of perf/skinny_linear_bench.py --sweep at the decode projections' shapes (N, K),
# NVIDIA H200, 2026-11-30 (perf/data/skinny_linear_h200_2026-11-30c.log); other shapes: skinny_config
MEASURED = {
    (6144, 4096): SkinnyConfig(64, 256, 8, 4),  # Llama-3-8B q|k|v
    (4096, 4096): SkinnyConfig(32, 256, 4, 5),  # o_proj
    (28672, 4096): SkinnyConfig(64, 128, 4, 3),  # gate|up
    (4096, 14336): SkinnyConfig(32, 256, 4, 5),  # down
    (3072, 4096): SkinnyConfig(32, 256, 4, 5),  # the same at TP=2
    (4096, 2048): SkinnyConfig(32, 256, 4, 5),
    (14336, 4096): SkinnyConfig(64, 128, 4, 3),
    (4096, 7168): SkinnyConfig(32, 256, 4, 5),
}


def skinny_config(n: int, k: int, device: torch.device) -> SkinnyConfig:
    """The measured tiles for a known shape; else the widest column slice that still gives every
    multiprocessor a program (16 at least), K in 512-wide steps (256 for 64-wide slices: the same
    bytes in flight per stage)."""
    if device.type != "cuda":
        return SkinnyConfig(16, 32, 4, 1)  # the interpreter: small tiles, several K steps
    if (n, k) in MEASURED:
        return MEASURED[(n, k)]
    sms = _num_sms(device)
    block_n = 16
    for bn in (32, 64):
        if triton.cdiv(n, bn) >= sms:
            block_n = bn
    return SkinnyConfig(block_n, 256 if block_n == 64 else 512)


def skinny_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, out_dtype=None, config: SkinnyConfig | None = None
) -> Tensor:
    """x [..., K] (at most 16 rows in all) by weight [N, K] (+ bias [N]) -> [..., N] in out_dtype
    (default x's), products summed in float32. `config` overrides the tiles `skinny_config` picks.
    Under PDL the kernel reads the weight before it waits for the kernel before it: the weight must
    be constant (a layer's), never something this step writes."""
    if not use_triton(x):
        return skinny_linear_ref(x, weight, bias, out_dtype)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    assert m <= 16, f"skinny_linear takes at most 16 rows, not {m}"
    assert x2.stride(1) == 1 and weight.stride(1) == 1, "rows of x and of the weight must be contiguous"
    assert x.dtype == weight.dtype, "x and the weight must share a dtype"
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    cfg = config or skinny_config(n, k, x.device)
    _skinny_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, weight, bias if bias is not None else weight, y, m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32",
        BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


MODE = os.environ.get("LLA_SKINNY_LINEAR", "1")  # 0: every projection through cuBLAS; all: every shape


def routed(n: int, k: int) -> bool:
    """Whether a few-row projection of weight [n, k] goes to `skinny_linear`: with the default
    mode, weights of at least 3072 rows of at least 4096 columns. Measured in the decode step
    (NVIDIA H200, 2026-11-30, perf/RESULTS.md): there it beats cuBLAS at Llama-3-8B's projections,
    whole and at TP=2, once it starts early (programmatic dependent launch); at DeepSeek-V2-Lite's
    (2048 columns, or 2048 rows) cuBLAS is faster and the step 0.07 ms shorter without it."""
    if MODE == "0":
        return False
    return MODE == "all" or (n >= 3072 and k >= 4096)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, out_dtype=None) -> Tensor:
    """The model's projections: `skinny_linear` for CUDA tensors of at most MAX_ROWS rows in a
    16-bit dtype at the shapes `routed` picks (decode at small batch; decided by the shapes alone,
    so the same in a CUDA graph), else `F.linear` (cuBLAS; torch.mm with float32 out when
    out_dtype asks for it)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        x.is_cuda
        and 0 < rows <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(1) == 1
        and x.stride(-1) == 1
        and routed(*weight.shape)
    ):
        return skinny_linear(x, weight, bias, out_dtype)
    if out_dtype is None or out_dtype == x.dtype:
        return cpu_shapes.linear(x, weight, bias)  # (F.linear; on the CPU at a bounded row count)
    assert bias is None and x.dim() == 2, "a float32 output is for the router's [T, H] @ [E, H]^T"
    if x.is_cuda:
        return torch.mm(x, weight.t(), out_dtype=out_dtype)
    return F.linear(x.to(out_dtype), weight.to(out_dtype))  # (no torch.mm with out_dtype there)
