"""The tensor-parallel group a model is built for, and its two collectives.

Every rank builds the same model with its `TPGroup`; the parallel layers (`layers/linear.py`,
`layers/embedding.py`) allocate their local shards and say which dim of which checkpoint tensor is
split (`tp_dims`), and `models/weights.py` gives each rank its slice (`TPGroup.shard`) of the full
tensors every rank reads. All ranks must run every forward in lockstep: the collectives are
blocking, and a rank that skips one hangs the others.

With size 1 (`SINGLE`) nothing here communicates or copies: the collectives return their input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# all_gather_single is the name from torch 2.13 on; earlier versions have only the older one
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group: `rank` of `size`, communicating over
    `group` (a torch.distributed ProcessGroup; None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum `x` over the ranks, in place; every rank gets the same bits."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

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
