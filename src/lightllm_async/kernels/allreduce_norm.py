"""All-reduce + residual add + RMSNorm in one kernel, over symmetric memory (one host's GPUs).

Under tensor parallelism every row-parallel output (o_proj, down) is a partial sum that is
all-reduced and then, at once, added to the residual and normalized. Fused, each decode step
saves a launch and a round trip through global memory per layer boundary, and the all-reduce
itself is a one-shot exchange: every rank publishes its partial row in its own symmetric buffer,
and every rank reads all of them over NVLink and sums them in rank order (so every rank computes
the same bits).

Layout (`Peers`): each rank's symmetric buffer is [2, max_rows, row_stride] of the activations'
dtype; row r of a call always lives at slot r of one of the two halves. Each rank's signal pad
holds, from word `sig_base` on, one int32 flag per (row, sender): [max_rows, world].

Memory ordering, program r of one call on rank A (all ranks launch the same grid, M programs):
1. Every thread stores its part of the partial row into A's buffer, half h = PARITY[r].
2. `debug_barrier` (bar.sync) orders all the CTA's stores before step 3 (CTA scope, then made
   cumulative by the release below).
3. For each peer P: CAS A's flag in P's pad, slot (r, A), 0 -> 1 with release semantics at system
   scope, retried until it succeeds: a flag still 1 is P's unconsumed signal of an earlier call,
   so a signal is never lost or merged (a token protocol).
4. For each peer P: CAS P's flag in A's own pad, slot (r, P), 1 -> 0 with acquire semantics at
   system scope, spinning until it succeeds. The acquire synchronizes with P's release of step
   3, so P's stores of step 1 are visible; a second `debug_barrier` extends that to every thread.
5. Read every rank's row r (volatile loads, which bypass L1) in rank order, sum in fp32.

Buffer reuse: the parity is per row slot and lives on the device (PARITY[r], flipped by program
r at each call that reaches it), not on the host. A host parity baked into CUDA graphs breaks
whenever a graph of an odd number of calls is replayed twice in a row, or graphs are replayed in
another order than captured; a device parity flips on every execution, captured or eager, the
same on every rank (all ranks execute the same calls). Why it is safe: A's program r writes half
h of slot r at call c. The previous reader of A's (h, r) is every peer's program r at call c',
the last call before c in which program r ran with parity h; program r also ran in between, at
a call c'' with parity 1 - h (parities alternate per slot). At c'', A's program r waited for
every peer's program r to signal, so every peer had started kernel c'', hence (stream order)
finished kernel c' and its reads. A's kernel c starts after A's kernel c'' finished. So no
second barrier at the end of the kernel is needed. Row slots are fixed (row r at r * row_stride
whatever the call's N), so different calls' rows never overlap in other slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import jit, tl, triton, use_triton
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
    """Where a rank finds every rank's symmetric buffer and signal pad (see the module docstring
    for the layout). The tensors live on the kernel's device."""

    buffers: Tensor  # [world] int64, address of each rank's buffer [2, max_rows, row_stride]
    signal_pads: Tensor  # [world] int64, address of each rank's signal pad (int32 words)
    parity: Tensor  # [max_rows] int32, this rank's half for each row slot (only this rank's)
    rank: int
    world: int
    max_rows: int
    row_stride: int  # elements per row slot: the largest N a call may have
    sig_base: int  # first pad word used here: [max_rows, world] flags from there


@jit
def _signal_and_wait(SIGNAL_PADS, sig_base, row, rank, WORLD: tl.constexpr):
    # a token per (row, sender): sent 0 -> 1 (release), taken 1 -> 0 (acquire), both system scope
    for peer in tl.static_range(WORLD):
        pad = tl.load(SIGNAL_PADS + peer).to(tl.pointer_type(tl.int32))
        flag = pad + sig_base + row * WORLD + rank
        while tl.atomic_cas(flag, 0, 1, sem="release", scope="sys") != 0:
            pass
    own = tl.load(SIGNAL_PADS + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        flag = own + sig_base + row * WORLD + peer
        while tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys") != 1:
            pass


@jit
def _allreduce_add_rms_norm_kernel(
    X,  # [M, N] this rank's partial sum
    R,  # [M, N] residual added to the sum (unused unless HAS_RESIDUAL)
    W,  # [N] weight
    OUT,  # [M, N] normalized output, contiguous
    R_OUT,  # [M, N] sum (+ residual), the next residual, contiguous
    BUFFERS,  # [WORLD] int64 addresses of the ranks' symmetric buffers [2, max_rows, row_stride]
    SIGNAL_PADS,  # [WORLD] int64 addresses of the ranks' signal pads (int32)
    PARITY,  # [max_rows] int32, the half each row slot uses next on this rank
    rank,  # this rank
    stride_x,  # row stride of X
    stride_r,  # row stride of R
    N,  # row length, <= row_stride
    max_rows,  # row slots per half
    row_stride,  # elements per row slot
    sig_base,  # first signal pad word of the [max_rows, WORLD] flags
    eps,  # added to the mean square
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # >= N, a power of two: one program reduces and normalizes one row
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    half = tl.load(PARITY + row)
    slot = (half * max_rows + row).to(tl.int64) * row_stride

    # -- publish this rank's partial row, then exchange signals with every peer --
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=mask)
    own = tl.load(BUFFERS + rank).to(tl.pointer_type(X.dtype.element_ty))
    tl.store(own + slot + offs, x, mask=mask)
    tl.debug_barrier()
    _signal_and_wait(SIGNAL_PADS, sig_base, row, rank, WORLD)
    tl.debug_barrier()

    # -- sum every rank's row in rank order (the same bits on every rank), rounded as stored --
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        buf = tl.load(BUFFERS + peer).to(tl.pointer_type(X.dtype.element_ty))
        acc += tl.load(buf + slot + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    tl.store(PARITY + row, 1 - half)
    s = acc.to(R_OUT.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(R + row.to(tl.int64) * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (s.to(tl.float32) + r).to(R_OUT.dtype.element_ty)
    out_row = row.to(tl.int64) * N
    tl.store(R_OUT + out_row + offs, s, mask=mask)

    # -- normalize --
    v = s.to(tl.float32)
    var = tl.sum(v * v, axis=0) / N
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    out = v * tl.math.rsqrt(var + eps) * w
    tl.store(OUT + out_row + offs, out.to(OUT.dtype.element_ty), mask=mask)


def allreduce_add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, peers: Peers
) -> tuple[Tensor, Tensor]:
    """`allreduce_add_rms_norm_ref` of every rank's `x`, run collectively: every rank of `peers`
    must call it with the same shapes, in the same order. Returns (out, residual_out)."""
    assert use_triton(x), "the fused all-reduce has no reference path: it needs the peers' memory"
    n = x.shape[-1]
    assert weight.shape == (n,), f"weight {tuple(weight.shape)} for rows of {n}"
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    assert x2.stride(-1) == 1, "rows must be contiguous"
    assert m <= peers.max_rows and n <= peers.row_stride, f"{m} rows of {n} exceed the buffer"
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(out)
    r2 = x2  # a placeholder without a residual
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} vs x {tuple(x.shape)}"
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1, "residual rows must be contiguous"
    if m:
        block = triton.next_power_of_2(n)
        _allreduce_add_rms_norm_kernel[(m,)](
            x2, r2, weight, out, r_out, peers.buffers, peers.signal_pads, peers.parity,
            peers.rank, x2.stride(0), r2.stride(0), n, peers.max_rows, peers.row_stride,
            peers.sig_base, eps,
            WORLD=peers.world, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return out.view(x.shape), r_out.view(x.shape)
