"""The scheduler's KV ownership invariants, checked from the outside (tests only)."""

from __future__ import annotations

from collections import Counter

from lightllm_async.engine.radix_cache import RadixCache
from lightllm_async.engine.scheduler import Scheduler


def check_kv_ownership(s: Scheduler) -> None:
    """Every KV slot is exactly one of: free in the pool, a running request's private tail, held
    by the prefix cache. A running request's cached head is the path it locked; every node's
    reference count is the number of running requests whose path passes through it; the
    evictable count is the tokens of unreferenced nodes. Waiting requests hold nothing, but for a
    request handed over by a prefill engine (--pd), which holds a lock on the path of its
    received KV (`held_node`) until its admission."""
    cache = s.kv.cache
    free = list(s.tokens._free)
    holders = s.running + s.handing_off  # --pd: a handed-off request keeps its KV until it is sent
    private = [slot for r in holders for slot in r.kv_slots[r.num_cached :]]
    nodes = list(cache.nodes()) if isinstance(cache, RadixCache) else []
    held = [slot for n in nodes for slot in n.slots]
    owners = Counter(free) + Counter(private) + Counter(held)
    assert set(owners) == set(range(s.tokens.capacity)), "a slot leaked (in no place) or is out of range"
    doubled = {slot: k for slot, k in owners.items() if k > 1}
    assert not doubled, f"slots in two places at once: {doubled}"
    for r in s.waiting:
        assert r.kv_slots == [] and r.cache_node is None and r.num_cached == 0 and r.row == -1
    if not isinstance(cache, RadixCache):
        assert all(r.num_cached == 0 for r in s.running)
        return
    refs: Counter = Counter()
    for r in holders:
        assert r.kv_slots[: r.num_cached] == cache.path_slots(r.cache_node)
    for r in holders + list(s.waiting):
        for node in (r.cache_node, r.held_node):
            while node is not None and node is not cache.root:
                refs[id(node)] += 1
                node = node.parent
    for n in nodes:
        assert n.refs >= 0 and n.refs == refs[id(n)], (n.refs, refs[id(n)])
        assert len(n.key) == len(n.slots) > 0
        assert all(n.children[k].key[0] == k and n.children[k].parent is n for k in n.children)
    assert cache.num_tokens == len(held)
    assert cache.num_evictable == sum(len(n.key) for n in nodes if n.refs == 0)
    assert cache._leaves == {n for n in nodes if n.refs == 0 and not n.children}
    live = {(n.last_access, n.serial) for n in cache._leaves}
    assert live <= {(access, serial) for access, serial, _ in cache._heap}, "a leaf eviction can't find"
    assert s.num_free_tokens == len(free) + cache.num_evictable
