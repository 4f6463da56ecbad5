"""All-reduce + residual add + RMSNorm in one kernel, over symmetric memory (one host's GPUs).

Under tensor parallelism every row-parallel output (o_proj, down) is a partial sum that is
all-reduced and then, at once, added to the residual and normalized. Fused, each decode step
saves a launch and a round trip through global memory per layer boundary. The same kernel without
the norm is the small all-reduce of a few rows (the vocabulary-parallel embedding's).

The exchange is one-shot and push-based, with the data as its own flag (the "Lamport" scheme of
TensorRT-LLM's low-latency all-reduce): every rank *stores* its partial row straight into each
peer's symmetric buffer over NVLink, and waits on its *own* buffer until every peer's row has
arrived. An element is empty while it holds a sentinel bit pattern (-0.0: 0x8000 for 16-bit
dtypes, 0x80000000 for float32); senders send -0.0 as +0.0, which changes no sum, so a sentinel is
never a value. No flag, fence or remote read is on the path: one NVLink write's latency and local
polling. (The first version signalled with remote compare-and-swaps and then read the peers'
buffers: two NVLink round trips, ~7 us a call at one row on 2 H200s.)

Layout (`Peers`): each rank's symmetric buffer is [2, world, max_rows, row_stride] of the
activations' width in integers; rank A's row r of a call arrives in every peer's buffer at
[h, A, r], h = COUNT[r] & 1, where COUNT[r] counts this rank's calls that had a row r (every rank
makes the same calls, so every rank has the same counts, on the device: a CUDA graph replayed any
number of times, in any order, stays in step). A reader empties each slot (stores the sentinel)
right after it has read it.

Why a slot is empty when a peer writes it again: A writes [h, A, r] in B's buffer at call c, and
next at call c + 2 (rows' halves alternate). A gets past call c + 1 only once B's row of c + 1
has arrived, which B sends in its kernel c + 1, after its kernel c (stream order) read and
emptied [h, A, r]. The sum is taken in rank order in fp32 on every rank, from the same bits: the
ranks' results are bit-equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import jit, pdl_launch, pdl_wait, tl, triton, use_triton
from .rms_norm import rms_norm_ref


def allreduce_add_rms_norm_ref(
    partials: list[Tensor], residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """rms_norm(sum(partials) + residual) and the new residual sum(partials) + residual (just the
    sum without a residual). The sum is taken in fp32 in rank order and rounded to the storage
    dtype, as an all-reduce returns it, before rms_norm_ref adds the residual and normalizes."""
    # reads each partial over the interconnect once, residual once, writes two rows: (world + 3) * x.nbytes
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    x = total.to(partials[0].dtype)
    if residual is None:
        return rms_norm_ref(x, weight, eps), x
    return rms_norm_ref(x, weight, eps, residual)


@dataclass(frozen=True)
class Peers:
    """Where a rank finds every rank's symmetric buffer (see the module docstring for the
    layout). The tensors live on the kernel's device."""

    buffers: Tensor  # [world] int64, address of each rank's buffer [2, world, max_rows, row_stride]
    count: Tensor  # [max_rows] int32, this rank's calls so far that had each row
    rank: int
    world: int
    max_rows: int
    row_stride: int  # elements per row slot: the largest N a call may have


def empty_bits(dtype: torch.dtype) -> int:
    """The sentinel of an empty element of `dtype`, as the signed integer of its width (-0.0)."""
    return -(1 << 15) if dtype.itemsize == 2 else -(1 << 31)


def int_view(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype.itemsize == 2 else torch.int32


@jit
def _allreduce_add_rms_norm_kernel(
    X,  # [M, N] this rank's partial sum
    R,  # [M, N] residual added to the sum (unused unless HAS_RESIDUAL)
    W,  # [N] weight (unused unless HAS_NORM)
    OUT,  # [M, N] normalized output, contiguous (unused unless HAS_NORM)
    R_OUT,  # [M, N] sum (+ residual), the next residual, contiguous
    BUFFERS,  # [WORLD] int64 addresses of the ranks' buffers [2, WORLD, max_rows, row_stride]
    COUNT,  # [max_rows] int32, calls so far that had each row
    stride_x,  # row stride of X
    stride_r,  # row stride of R
    N,  # row length, <= row_stride
    max_rows,  # row slots per sender and half
    row_stride,  # elements per row slot
    eps,  # added to the mean square
    RANK: tl.constexpr,  # this rank (one compile per rank: the peers are known statically)
    WORLD: tl.constexpr,
    WIDE: tl.constexpr,  # 32-bit elements (float32), else 16-bit
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK: tl.constexpr,  # >= N, a power of two: one program reduces (and normalizes) one row
    PDL: tl.constexpr,  # launched with launch_pdl (backend.pdl_launch)
):  # fmt: skip
    pdl_wait(PDL)  # started early: wait for the kernel before, then let the next one start
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    count = tl.load(COUNT + row)
    half = count & 1
    if WIDE:
        ity: tl.constexpr = tl.int32
        EMPTY: tl.constexpr = -2147483648
    else:
        ity: tl.constexpr = tl.int16
        EMPTY: tl.constexpr = -32768

    # -- push this rank's row into every peer's buffer (-0.0 goes as +0.0: never the sentinel) --
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=mask, other=0.0)
    bits = x.to(ity, bitcast=True)
    bits = tl.where(bits == EMPTY, tl.zeros_like(bits), bits)
    x = bits.to(X.dtype.element_ty, bitcast=True)
    sent = ((half * WORLD + RANK) * max_rows + row).to(tl.int64) * row_stride
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            buf = tl.load(BUFFERS + peer).to(tl.pointer_type(ity))
            tl.store(buf + sent + offs, bits, mask=mask)

    # what the epilogue reads, loaded now: its latency passes while the peers' rows travel
    if HAS_RESIDUAL:
        r = tl.load(R + row.to(tl.int64) * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)

    # -- take every peer's row from this rank's buffer as it arrives; sum in rank order --
    own = tl.load(BUFFERS + RANK).to(tl.pointer_type(ity))
    empty = tl.full((BLOCK,), EMPTY, ity)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == RANK:
            acc += x.to(tl.float32)
        else:
            slot = own + ((half * WORLD + peer) * max_rows + row).to(tl.int64) * row_stride + offs
            got = tl.load(slot, mask=mask, other=0, volatile=True)
            while tl.max((got == EMPTY).to(tl.int32), axis=0) > 0:
                got = tl.load(slot, mask=mask, other=0, volatile=True)
            tl.store(slot, empty, mask=mask)  # empty again for the peer's call after next
            acc += got.to(X.dtype.element_ty, bitcast=True).to(tl.float32)
    tl.store(COUNT + row, count + 1)
    s = acc.to(R_OUT.dtype.element_ty)
    if HAS_RESIDUAL:
        s = (s.to(tl.float32) + r).to(R_OUT.dtype.element_ty)
    out_row = row.to(tl.int64) * N
    tl.store(R_OUT + out_row + offs, s, mask=mask)

    # -- normalize --
    if HAS_NORM:
        v = s.to(tl.float32)
        var = tl.sum(v * v, axis=0) / N
        out = v * tl.math.rsqrt(var + eps) * w
        tl.store(OUT + out_row + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float, peers: Peers):
    assert use_triton(x), "the fused all-reduce has no reference path: it needs the peers' memory"
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    assert x2.stride(-1) == 1, "rows must be contiguous"
    assert m <= peers.max_rows and n <= peers.row_stride, f"{m} rows of {n} exceed the buffer"
    assert x.dtype.itemsize in (2, 4), f"{x.dtype}: 16- or 32-bit elements"
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if weight is not None else x2
    r_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = x2  # a placeholder without a residual
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} vs x {tuple(x.shape)}"
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1, "residual rows must be contiguous"
    if m:
        block = triton.next_power_of_2(n)
        _allreduce_add_rms_norm_kernel[(m,)](
            x2, r2, weight if weight is not None else x2, out, r_out, peers.buffers, peers.count,
            x2.stride(0), r2.stride(0), n, peers.max_rows, peers.row_stride, eps,
            RANK=peers.rank, WORLD=peers.world, WIDE=x.dtype.itemsize == 4,
            HAS_RESIDUAL=residual is not None, HAS_NORM=weight is not None, BLOCK=block,
            **pdl_launch(x), num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return out.view(x.shape), r_out.view(x.shape)


def allreduce_add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, peers: Peers
) -> tuple[Tensor, Tensor]:
    """`allreduce_add_rms_norm_ref` of every rank's `x`, run collectively: every rank of `peers`
    must call it (or `allreduce_rows`) with the same shapes, in the same order. Returns
    (out, residual_out)."""
    n = x.shape[-1]
    assert weight.shape == (n,), f"weight {tuple(weight.shape)} for rows of {n}"
    return _launch(x, residual, weight, eps, peers)


def allreduce_rows(x: Tensor, peers: Peers) -> Tensor:
    """The sum of every rank's `x` (in rank order, in fp32, rounded as stored), over the same
    buffers and with the same calling rule as `allreduce_add_rms_norm`."""
    return _launch(x, None, None, 0.0, peers)[1]
