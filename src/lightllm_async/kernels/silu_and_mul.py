"""SiLU-and-mul, the gate of the Llama MLP: silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_cpu_path, use_triton


def silu_and_mul_ref(x: Tensor) -> Tensor:
    # reads x [T, 2I] once, writes [T, I]: 1.5 * x.nbytes
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def silu_and_mul_cpu(x: Tensor) -> Tensor:
    """The CPU path: the reference's float32 arithmetic, in place where it can."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.float()).mul_(up).to(x.dtype)


@jit
def _silu_and_mul_kernel(
    X,  # [T, 2I]: gate in the first I columns, up in the last I
    OUT,  # [T, I], contiguous
    stride_x,  # row stride of X
    I,  # noqa: E741  intermediate size
    BLOCK: tl.constexpr,  # columns per program
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I

    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * I + offs, out.to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """[T, 2I] -> [T, I]."""
    if not use_triton(x):
        return silu_and_mul_cpu(x) if use_cpu_path(x) else silu_and_mul_ref(x)
    assert x.shape[-1] % 2 == 0, f"last dim {x.shape[-1]} is not 2 * I"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1, "rows must be contiguous"
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, out, x2.stride(0), inter, BLOCK=block, **pdl_launch(x), num_warps=4)
    return out.view(*x.shape[:-1], inter)
