"""RMSNorm with an optional fused residual add, whose input may be the unsummed parts of a sum (the
MoE's per-expert outputs: the norm after the layer sums them, saving the sum's own launch)."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_cpu_path, use_triton


def sum_parts(x: Tensor, residual: Tensor | None) -> Tensor:
    """x of one more dim than the residual, [..., P, N]: its P parts summed (float32, rounded once),
    as `torch.sum` sums them; else x."""
    if residual is not None and x.dim() == residual.dim() + 1:
        return x.sum(dim=-2)
    return x


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    # reads x (+ residual) once, writes out (+ residual_out) once: 2 or 4 * x.nbytes
    x = sum_parts(x, residual)
    if residual is not None:
        # the sum is rounded to x.dtype before normalizing, as in HF where the add is in x.dtype
        residual = (x.float() + residual.float()).to(x.dtype)
        x = residual
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    out = (xf * torch.rsqrt(var + eps) * weight.float()).to(x.dtype)
    return out if residual is None else (out, residual)


def rms_norm_cpu(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """The CPU path: the add in x's dtype, then torch's rms_norm in float32, rounded once: the
    reference's arithmetic in fewer ops (float32: its values bit for bit)."""
    x = sum_parts(x, residual)
    if residual is not None:
        x = residual = x + residual
    out = torch.nn.functional.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)
    return out.to(x.dtype) if residual is None else (out.to(x.dtype), residual)


@jit
def _rms_norm_kernel(
    X,  # [M, N] input rows, or [M, NUM_PARTS, N]: each row the sum of its parts
    R,  # [M, N] residual added to X first (unused unless HAS_RESIDUAL)
    W,  # [N] weight
    OUT,  # [M, N] normalized output, contiguous
    R_OUT,  # [M, N] X + R, the next residual, contiguous (unused unless HAS_RESIDUAL)
    stride_x,  # row stride of X
    stride_xp,  # part stride of X (unused unless NUM_PARTS > 1)
    stride_r,  # row stride of R
    N,  # row length
    eps,  # added to the mean square
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTS: tl.constexpr,  # 1: X holds rows; more: their parts, summed first
    BLOCK: tl.constexpr,  # >= N, a power of two: one program normalizes one whole row
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N

    # -- load (summing the parts in float32, rounded once as torch.sum does; then add the residual,
    # rounded to the storage type as the reference does) --
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_PARTS > 1:
        for p in tl.static_range(1, NUM_PARTS):
            x += tl.load(X + row * stride_x + p * stride_xp + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(X.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(R_OUT.dtype.element_ty)
        tl.store(R_OUT + row * N + offs, s, mask=mask)
        x = s.to(tl.float32)

    # -- normalize --
    var = tl.sum(x * x, axis=0) / N
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    out = x * tl.math.rsqrt(var + eps) * w
    tl.store(OUT + row * N + offs, out.to(OUT.dtype.element_ty), mask=mask)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """out = x / rms(x) * weight over the last dim; with `residual`, x + residual is normalized and
    returned too as the new residual: (out, residual_out). With a residual, x may have one dim more,
    [..., P, N]: the P parts of the input, summed first (as x.sum(-2))."""
    if not use_triton(x):
        fallback = rms_norm_cpu if use_cpu_path(x) else rms_norm_ref
        return fallback(x, weight, eps, residual)
    n = x.shape[-1]
    assert weight.shape == (n,), f"weight {tuple(weight.shape)} for rows of {n}"
    parts = residual is not None and x.dim() == residual.dim() + 1
    shape = x.shape[:-2] + x.shape[-1:] if parts else x.shape
    x3 = x.reshape(-1, x.shape[-2] if parts else 1, n)
    assert x3.stride(-1) == 1, "rows must be contiguous"
    out = torch.empty((x3.shape[0], n), dtype=x.dtype, device=x.device)
    r2, r_out = out, out  # placeholders when there is no residual
    if residual is not None:
        assert residual.shape == shape, f"residual {tuple(residual.shape)} vs x {tuple(x.shape)}"
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1, "residual rows must be contiguous"
        r_out = torch.empty_like(out)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x3.shape[0],)](
        x3, r2, weight, out, r_out, x3.stride(0), x3.stride(1), r2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, NUM_PARTS=x3.shape[1], BLOCK=block,
        **pdl_launch(x), num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    out = out.view(shape)
    return out if residual is None else (out, r_out.view(shape))
