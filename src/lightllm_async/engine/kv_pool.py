"""Free lists of KV token slots and request-table rows. Plain Python, no torch.

The KV cache is token-level (page size 1): a request has one cache row per token it has
computed, anywhere in the pool, its own or shared through the prefix cache (kv_manager.py says
which). The runner maps a request's positions to those rows through the request-to-token table,
whose rows come from `RowPool`.
"""

from __future__ import annotations


class TokenPool:
    """Hands out indices of KV cache rows (token slots)."""

    def __init__(self, num_tokens: int):
        if num_tokens <= 0:
            raise ValueError("the KV cache needs at least one token slot")
        self.capacity = num_tokens
        # A stack: the most recently freed rows are reused first, which keeps hot rows in cache.
        self._free = list(range(num_tokens - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV token slots, {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        return taken

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)


class RowPool:
    """Hands out rows of the request-to-token table: one per running request."""

    def __init__(self, num_rows: int):
        self.capacity = num_rows
        self._free = list(range(num_rows - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def free(self, row: int) -> None:
        self._free.append(row)
