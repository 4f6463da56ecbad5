"""Who owns which KV token slot: the pool, a running request, or the prefix cache. Plain Python.

A running request's `kv_slots` has one slot per scheduled position. The first `num_cached` are
the prefix cache's, on the path the request locked; the rest are its private tail, allocated
from the pool. When the request leaves (finish, abort, preemption), its computed positions go to
the cache (prompt and output alike, so a resumed request or a conversation's next turn hits them)
and what the cache already held or nothing wrote goes back to the pool.
"""

from __future__ import annotations

from lightllm_async.engine.kv_pool import TokenPool
from lightllm_async.engine.radix_cache import NoPrefixCache, RadixCache
from lightllm_async.engine.request import Request


class KVManager:
    """The token pool and the prefix cache over it, seen as one capacity: free slots plus the
    cached slots that no running request uses (those are evicted on demand)."""

    def __init__(self, num_tokens: int, prefix_cache: bool = True):
        self.tokens = TokenPool(num_tokens)
        self.cache = RadixCache(self.tokens) if prefix_cache else NoPrefixCache(self.tokens)

    @property
    def capacity(self) -> int:
        return self.tokens.capacity

    @property
    def num_free(self) -> int:
        return self.tokens.num_free + self.cache.num_evictable

    def allocate(self, n: int) -> list[int]:
        """n slots from the pool, evicting cached ones if it runs short; MemoryError beyond
        `num_free`."""
        short = n - self.tokens.num_free
        if short > 0:
            self.cache.evict(short)
        return self.tokens.allocate(n)

    def allocate_each(self, n: int) -> list[int]:
        """n slots in the order n calls of allocate(1) would give them (the same slots too, the
        same cached prefixes evicted): one for each of n requests at once. MemoryError beyond
        `num_free`."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV token slots, {self.num_free} free")
        slots = self.tokens.allocate(min(n, self.tokens.num_free))
        slots.reverse()  # allocate(1) pops the end of the free stack
        while len(slots) < n:  # allocate(1) on an empty pool evicts one leaf, then pops
            self.cache.evict(1)
            more = self.tokens.allocate(min(n - len(slots), self.tokens.num_free))
            more.reverse()
            slots += more
        return slots

    # -- a request's prefix ---------------------------------------------------------------------

    @staticmethod
    def shares_prefix(req: Request) -> bool:
        """Whether `req` may take a cached prefix. Not with prompt logprobs or penalties: these
        read every position fed to the model in the request's own row (the prompt's logits; the
        runner's token table), and a cached prefix is never fed."""
        p = req.params
        return not (
            p.prompt_logprobs or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        )

    @classmethod
    def _lookup_key(cls, req: Request) -> list[int]:
        if not cls.shares_prefix(req):
            return []
        # The last known token is always computed again: its logits give the next token.
        return req.token_ids(0, req.num_tokens - 1)

    def probe(self, req: Request) -> tuple[int, int]:
        """(hit, pinned) for a waiting request: the cached positions it would reuse, and how many
        of them admitting it would take from the free capacity."""
        return self.cache.probe(self._lookup_key(req))

    def acquire_prefix(self, req: Request) -> int:
        """On admission: reuse the cached prefix (locked for as long as the request runs); the
        request starts computing after it. Returns the hit."""
        slots, node = self.cache.match_prefix(self._lookup_key(req))
        self.cache.lock(node)
        req.cache_node, req.num_cached = node, len(slots)
        req.kv_slots = slots
        req.num_computed_tokens = len(slots)
        req.map_prefix = bool(slots)
        return len(slots)

    def cache_prompt(self, req: Request) -> None:
        """Once a running request's prompt is computed, cache it at once, so that requests that
        share it hit now rather than when this one finishes. Skipped when the tree already holds
        more of it than this request reuses: the request's own slots would duplicate the tree's,
        and its row of the request-to-token table maps its own."""
        req.prompt_cached = True
        n = len(req.prompt_ids)
        if not self.cache.enabled or req.num_cached >= n:
            return
        if self.cache.probe(req.prompt_ids)[0] != req.num_cached:
            return
        held, node = self.cache.insert(req.prompt_ids, req.kv_slots[:n])
        assert held == req.num_cached, (held, req.num_cached)
        self.cache.lock(node)
        self.cache.unlock(req.cache_node)
        req.cache_node, req.num_cached = node, n

    def release(self, req: Request) -> None:
        """The request leaves: its computed positions go to the cache, its other private slots
        (duplicates of what the cache holds, and positions no step has written) to the pool."""
        done = req.num_computed_tokens
        held, _ = self.cache.insert(req.token_ids(0, done), req.kv_slots[:done])
        self.tokens.free(req.kv_slots[req.num_cached : max(held, req.num_cached)])
        self.tokens.free(req.kv_slots[done:])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node, req.num_cached, req.kv_slots = None, 0, []
        req.num_computed_tokens = 0
        req.map_prefix = req.prompt_cached = False
