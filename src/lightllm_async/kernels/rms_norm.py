"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import jit, tl, triton, use_cpu_path, use_triton


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    # reads x (+ residual) once, writes out (+ residual_out) once: 2 or 4 * x.nbytes
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
    if residual is not None:
        x = residual = x + residual
    out = torch.nn.functional.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)
    return out.to(x.dtype) if residual is None else (out.to(x.dtype), residual)


@jit
def _rms_norm_kernel(
    X,  # [M, N] input rows
    R,  # [M, N] residual added to X first (unused unless HAS_RESIDUAL)
    W,  # [N] weight
    OUT,  # [M, N] normalized output, contiguous
    R_OUT,  # [M, N] X + R, the next residual, contiguous (unused unless HAS_RESIDUAL)
    stride_x,  # row stride of X
    stride_r,  # row stride of R
    N,  # row length
    eps,  # added to the mean square
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # >= N, a power of two: one program normalizes one whole row
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N

    # -- load (and add the residual, rounded to the storage type as the reference does) --
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
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
    returned too as the new residual: (out, residual_out)."""
    if not use_triton(x):
        fallback = rms_norm_cpu if use_cpu_path(x) else rms_norm_ref
        return fallback(x, weight, eps, residual)
    n = x.shape[-1]
    assert weight.shape == (n,), f"weight {tuple(weight.shape)} for rows of {n}"
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1, "rows must be contiguous"
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2, r_out = x2, out  # placeholders when there is no residual
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} vs x {tuple(x.shape)}"
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1, "residual rows must be contiguous"
        r_out = torch.empty_like(out)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, r_out, x2.stride(0), r2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    out = out.view(x.shape)
    return out if residual is None else (out, r_out.view(x.shape))
