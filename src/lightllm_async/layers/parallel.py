"""The tensor-parallel group a model is built for, and its two collectives.

Every rank builds the same model with its `TPGroup`; the parallel layers (`layers/linear.py`,
`layers/embedding.py`) allocate their local shards and say which dim of which checkpoint tensor is
split (`tp_dims`), and `models/weights.py` gives each rank its slice (`TPGroup.shard`) of the full
tensors every rank reads. All ranks must run every forward in lockstep: the collectives are
blocking, and a rank that skips one hangs the others.

With size 1 (`SINGLE`) nothing here communicates or copies: the collectives return their input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightllm_async.kernels import rms_norm
from lightllm_async.kernels.allreduce_norm import (
    Peers,
    allreduce_add_rms_norm,
    allreduce_rows,
    empty_bits,
    int_view,
)
from lightllm_async.kernels.backend import HAS_TRITON

# all_gather_single is the name from torch 2.13 on; earlier versions have only the older one
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group: `rank` of `size`, communicating over
    `group` (a torch.distributed ProcessGroup; None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    # small all-reduces over symmetric memory (a one-shot kernel: each rank reads its peers'
    # buffers over NVLink), far less latency than NCCL's for a decode step's activations
    small: SymmetricAllReduce | None = None
    # the same exchange fused with the residual add and RMSNorm that follow every row-parallel
    # output (`all_reduce_norm`), for up to a decode batch of rows
    fused: FusedAllReduceNorm | None = None

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of `x` over the ranks (in place through NCCL; a new tensor through symmetric
        memory): use the returned tensor. Every rank gets the same bits."""
        if self.size == 1:
            return x
        if self.fused is not None and self.fused.fits(x):  # a few rows: the lowest latency
            return self.fused.sum(x)
        if self.small is not None and self.small.fits(x):
            return self.small(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_norm(
        self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """rms_norm(sum of `x` over the ranks + residual) and that sum + residual, the next
        residual (the sum alone when `residual` is None): one fused kernel where it applies,
        else `all_reduce` then `rms_norm`. Every rank gets the same bits."""
        if self.size > 1 and self.fused is not None and self.fused.fits(x, residual):
            return self.fused(x, residual, weight, eps)
        x = self.all_reduce(x)
        if residual is None:
            return rms_norm(x, weight, eps), x
        return rms_norm(x, weight, eps, residual)

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """The ranks' shards concatenated along `dim`, rank 0 first."""
        if self.size == 1:
            return x
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # the shards stacked on dim 0
        _all_gather_flat(out, x.contiguous(), group=self.group)
        dim %= x.dim()
        return out.view(self.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)

    def broadcast(self, x: Tensor, src: int = 0) -> Tensor:
        """Rank `src`'s `x` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def agree_min(self, n: int, device) -> int:
        """The least of the ranks' `n` (a count every rank must share, e.g. KV cache slots)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def split(self, n: int, what: str) -> int:
        """n // size: this rank's share of `what`, which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's slice of a full tensor along `dim`: ceil(n / size) entries per rank, so
        where n does not divide the last ranks get fewer (a padded vocabulary), possibly none."""
        if self.size == 1:
            return x
        n = x.shape[dim]
        per_rank = -(-n // self.size)
        lo = min(self.rank * per_rank, n)
        return x.narrow(dim, lo, min(per_rank, n - lo))


SINGLE = TPGroup()


def _enable_symm_mem(symm_mem, group_name: str) -> None:
    """Older torch needs symmetric memory enabled per group; torch 2.11 keeps the call but warns
    that it is no longer needed (once per buffer, on every rank's log)."""
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group_name)


class SymmetricAllReduce:
    """One-shot all-reduce through torch's symmetric memory (torch.ops.symm_mem): the input is
    copied into this rank's registered buffer, and each rank sums every rank's buffer in rank
    order (the same bits everywhere). For tensors up to `max_bytes` of `dtype` on CUDA; CUDA-graph
    capturable. Built collectively by every rank of `group` (`create`), or None where the torch
    build or the machine lacks it."""

    def __init__(self, buf: Tensor, group_name: str):
        self.buf, self.group_name = buf, group_name

    @classmethod
    def create(cls, group, dtype: torch.dtype, device, max_bytes: int) -> SymmetricAllReduce | None:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            name = group.group_name
            _enable_symm_mem(symm_mem, name)
            buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, name)
            op = cls(buf, name)
            probe = torch.full((8,), 1.0, dtype=dtype, device=device)
            if not torch.equal(op(probe), torch.full_like(probe, float(dist.get_world_size(group)))):
                raise RuntimeError("a probe all-reduce gave a wrong sum")
            return op
        except Exception as exc:  # noqa: BLE001 - NCCL does every all-reduce then
            import logging

            logging.getLogger(__name__).warning(
                "symmetric-memory all-reduce unavailable (%r): NCCL only", exc
            )
            return None

    def fits(self, x: Tensor) -> bool:
        return x.dtype == self.buf.dtype and x.is_contiguous() and x.numel() <= self.buf.numel() and x.is_cuda

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.view(-1)
        out = torch.empty_like(flat)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            self.buf[: flat.numel()], flat, "sum", self.group_name, out
        )
        return out.view_as(x)


class FusedAllReduceNorm:
    """All-reduce + residual add + RMSNorm in one Triton kernel over symmetric memory
    (`kernels/allreduce_norm.py`), or the all-reduce alone (`sum`): for up to `max_rows` rows of
    at most `hidden` elements of `dtype` on CUDA; CUDA-graph capturable. Built collectively by
    every rank of `group` (`create`), or None where the torch build, Triton or the machine lacks
    it. Every rank must make the same calls in the same order (the kernel's buffer halves
    alternate per row slot)."""

    def __init__(self, peers: Peers, dtype: torch.dtype, keep: Tensor):
        self.peers, self.dtype = peers, dtype
        self._keep = keep  # the symmetric buffer the peers' addresses point into

    @classmethod
    def create(
        cls, group, dtype: torch.dtype, device, hidden: int, max_rows: int
    ) -> FusedAllReduceNorm | None:
        ok, op = False, None
        try:
            op = cls._build(group, dtype, device, hidden, max_rows) if HAS_TRITON else None
            ok = op is not None and op._probe(dist.get_world_size(group))
        except Exception as exc:  # noqa: BLE001 - all_reduce then rms_norm does it then
            import logging

            logging.getLogger(__name__).warning("fused all-reduce + RMSNorm unavailable (%r)", exc)
        agreed = torch.tensor([int(ok)], device=device)  # every rank uses it, or none does
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        return op if agreed.item() else None

    @classmethod
    def _build(cls, group, dtype, device, hidden: int, max_rows: int) -> FusedAllReduceNorm:
        import torch.distributed._symmetric_memory as symm_mem

        name, world, rank = group.group_name, dist.get_world_size(group), dist.get_rank(group)
        _enable_symm_mem(symm_mem, name)
        buf = symm_mem.empty(2 * world * max_rows * hidden, dtype=int_view(dtype), device=device)
        buf.fill_(empty_bits(dtype))  # every slot empty before any peer can write one
        handle = symm_mem.rendezvous(buf, name)
        # get_buffer may count from the start of the pooled allocation the buffer lies in (torch
        # 2.13's implicit pool) or from the buffer itself: the offset is the same on every rank
        offset = buf.data_ptr() - handle.get_buffer(rank, (1,), buf.dtype).data_ptr()
        buffers = [handle.get_buffer(p, (1,), buf.dtype).data_ptr() + offset for p in range(world)]
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's buffer is filled before the first call writes into it
        peers = Peers(
            buffers=torch.tensor(buffers, dtype=torch.int64, device=device),
            count=torch.zeros(max_rows, dtype=torch.int32, device=device),
            rank=rank,
            world=world,
            max_rows=max_rows,
            row_stride=hidden,
        )
        return cls(peers, dtype, buf)

    def _probe(self, world: int) -> bool:
        x = torch.full(
            (3, self.peers.row_stride), 1.0 + self.peers.rank, dtype=self.dtype, device=self._keep.device
        )
        weight = torch.ones(x.shape[-1], dtype=self.dtype, device=x.device)
        _, total = self(x, torch.zeros_like(x), weight, 1e-6)
        return torch.equal(total, torch.full_like(x, world * (world + 1) / 2))

    def fits(self, x: Tensor, residual: Tensor | None = None) -> bool:
        n = x.shape[-1]
        return (
            x.is_cuda
            and x.dtype == self.dtype
            and x.stride(-1) == 1
            and 0 < x.numel() // n <= self.peers.max_rows
            and n <= self.peers.row_stride
            and (residual is None or residual.dtype == self.dtype)
        )

    def __call__(
        self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return allreduce_add_rms_norm(x.contiguous(), residual, weight, eps, self.peers)

    def sum(self, x: Tensor) -> Tensor:
        """The all-reduce alone (no norm), over the same buffers: for a few rows."""
        return allreduce_rows(x.contiguous(), self.peers)
