"""The vocabulary matrix [V, H], split by rows across tensor-parallel ranks: the token embedding
(a lookup) and the LM head (a projection onto it), tied or not.

Rank r holds rows [r*Vr, (r+1)*Vr) with Vr = ceil(V / size); rows past V are padding, zero and
never looked up. A lookup finds each token on the one rank holding its row, the others contribute
zeros, and the sum over ranks is the embedding. The head's logits are gathered from every rank's
slice of the vocabulary, the padding dropped, so every rank gets all [S, V].
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightllm_async.kernels import cpu_shapes
from lightllm_async.layers.parallel import SINGLE, TPGroup


class VocabEmbedding(nn.Module):
    """A vocabulary-parallel [V, H] matrix: `forward` looks token ids up, `logits` projects onto it."""

    tp_dims: ClassVar[dict[str, int]] = {"weight": -2}  # the vocabulary rows

    def __init__(self, vocab_size: int, hidden: int, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.rows = -(-vocab_size // tp.size)  # per rank, padding included
        self.start = tp.rank * self.rows  # the first token id of this rank's rows
        self.weight = nn.Parameter(
            torch.empty(self.rows, hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, ids: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)  # [T, H]
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)  # [T]: tokens another rank holds
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))

    def logits(self, x: Tensor) -> Tensor:
        """[S, H] -> float32 [S, V], the same on every rank."""
        if self.tp.size == 1:
            return cpu_shapes.linear(x, self.weight).float()
        gathered = self.tp.all_gather(cpu_shapes.linear(x, self.weight), dim=-1)  # [S, size * Vr]
        return gathered[:, : self.vocab_size].float().contiguous()  # padding dropped
