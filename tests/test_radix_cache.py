"""The radix prefix cache alone, then under the scheduler: plain Python, milliseconds per test."""

from __future__ import annotations

import random

from kv_checks import check_kv_ownership
from lightllm_async.batch import Sampled
from lightllm_async.engine.kv_pool import TokenPool
from lightllm_async.engine.radix_cache import RadixCache, _common_prefix
from lightllm_async.engine.request import Request
from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig
from lightllm_async.types import SamplingParams


def cache_with(pool_size: int = 64) -> RadixCache:
    return RadixCache(TokenPool(pool_size))


def put(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Insert `tokens` with fresh slots from the pool, as a finished request would; its slots."""
    slots = cache.pool.allocate(len(tokens))
    held, _ = cache.insert(tokens, slots)
    cache.pool.free(slots[:held])  # duplicates of what the tree held
    return slots


def test_common_prefix_by_bisection_equals_the_plain_loop():
    rng = random.Random(4)
    for _ in range(500):
        key = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
        tokens = [rng.randrange(3) for _ in range(rng.randint(0, 50))]
        start = rng.randint(0, len(tokens))
        want = 0
        while want < min(len(key), len(tokens) - start) and key[want] == tokens[start + want]:
            want += 1
        assert _common_prefix(key, tokens, start) == want


def test_match_returns_the_slots_of_the_longest_cached_prefix_splitting_mid_edge():
    c = cache_with()
    a = put(c, [1, 2, 3, 4, 5, 6, 7])
    slots, node = c.match_prefix([1, 2, 3, 9, 9])
    assert slots == a[:3] and c.path_slots(node) == a[:3]
    assert len(list(c.nodes())) == 2  # the edge was cut after 3 tokens
    assert c.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])[0] == a
    assert c.match_prefix([2, 3])[0] == [] and c.match_prefix([])[0] == []
    b = put(c, [1, 2, 3, 8, 8])  # a branch at the cut: only its new tail is taken
    assert c.match_prefix([1, 2, 3, 8, 8])[0] == a[:3] + b[3:]
    assert c.num_tokens == 7 + 2 and c.pool.num_free == 64 - 9


def test_probe_changes_nothing_and_counts_the_unreferenced_part_of_the_hit():
    c = cache_with()
    put(c, [1, 2, 3, 4, 5, 6])
    _, node = c.match_prefix([1, 2, 3])
    c.lock(node)
    before = [(n.key, n.refs, n.last_access) for n in c.nodes()]
    assert c.probe([1, 2, 3, 4, 5, 9]) == (5, 2)  # 3 locked already, 2 would be pinned
    assert c.probe([1, 2]) == (2, 0)
    assert c.probe([7]) == (0, 0)
    assert [(n.key, n.refs, n.last_access) for n in c.nodes()] == before


def test_locked_paths_are_never_evicted_and_refcounts_stay_exact():
    c = cache_with(32)
    put(c, [1, 2, 3, 4])
    put(c, [1, 2, 5, 6])
    _, n1 = c.match_prefix([1, 2, 3, 4])
    _, n2 = c.match_prefix([1, 2, 5])
    c.lock(n1)
    c.lock(n2)
    assert c.num_evictable == 1  # token 6, alone
    shared = c.match_prefix([1, 2])[1]
    assert shared.refs == 2 and n1.refs == 1
    assert c.evict(100) == 1  # only the unreferenced leaf goes
    assert c.match_prefix([1, 2, 5, 6])[0] == c.path_slots(n2)
    c.unlock(n1)
    c.unlock(n2)
    assert c.num_evictable == c.num_tokens == 5 and shared.refs == 0
    try:
        c.unlock(n2)
    except RuntimeError:
        pass
    else:
        raise AssertionError("an unlock below zero must fail")
    assert c.evict(5) == 5 and c.num_tokens == 0 and c.pool.num_free == 32


def test_eviction_takes_least_recently_used_leaves_first_then_their_parents():
    c = cache_with(64)
    put(c, [1, 1, 1])  # oldest
    put(c, [2, 2, 2])
    put(c, [3, 3, 3, 3])
    put(c, [3, 3, 4])  # splits [3,3,3,3] into [3,3] + [3,3] and [4]
    c.match_prefix([1, 1, 1])  # touched: now the most recent
    assert c.evict(1) == 3  # [2,2,2], the least recently used leaf, whole
    assert c.probe([2, 2, 2])[0] == 0 and c.probe([1, 1, 1])[0] == 3
    assert c.evict(2) == 2  # the older leaf under [3,3]: its [3,3] tail
    assert c.probe([3, 3, 3, 3])[0] == 2 and c.probe([3, 3, 4])[0] == 3
    assert c.evict(2) == 3  # [4] (1 token), then [3,3], left childless and next in age (2 more)
    assert c.probe([3, 3, 4])[0] == 0 and c.probe([1, 1, 1])[0] == 3
    assert c.num_tokens == 3 and c.pool.num_free == 64 - 3


def test_each_eviction_takes_the_least_recently_used_unreferenced_leaf():
    """Against a brute-force search over the tree, through random inserts, lookups, locks and
    unlocks (the eviction heap is kept incrementally, with stale entries)."""
    rng = random.Random(12)
    c = cache_with(400)
    locked = []
    for _ in range(3000):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 9))]
        if op < 0.3 and c.pool.num_free >= len(tokens):
            put(c, tokens)
        elif op < 0.5:
            c.match_prefix(tokens)
        elif op < 0.6:
            _, node = c.match_prefix(tokens)
            if node is not c.root:
                c.lock(node)
                locked.append(node)
        elif op < 0.7 and locked:
            c.unlock(locked.pop(rng.randrange(len(locked))))
        elif c.num_evictable:
            leaves = [n for n in c.nodes() if n.refs == 0 and not n.children]
            oldest = min(leaves, key=lambda n: (n.last_access, n.serial))
            before = set(c.nodes())
            assert c.evict(1) == len(oldest.slots)
            assert set(c.nodes()) == before - {oldest}  # that leaf, and nothing else
        assert c.pool.num_free + c.num_tokens == 400


def test_evict_frees_at_least_what_is_asked_when_the_tree_holds_it():
    c = cache_with(100)
    rng = random.Random(3)
    for _ in range(20):
        put(c, [rng.randrange(4) for _ in range(rng.randint(1, 8))])
    for ask in (1, 5, 13):
        before = c.num_tokens
        freed = c.evict(ask)
        assert freed >= min(ask, before) and c.num_tokens == before - freed
    assert c.pool.num_free + c.num_tokens == 100


# -- under the scheduler ------------------------------------------------------------------------


def make_sched(kv=512, running=8, budget=64, max_len=128, prefix_cache=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_running_requests=running,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            kv_cache_tokens=kv,
            expected_output_tokens=16,
            enable_prefix_cache=prefix_cache,
        )
    )


def run(s: Scheduler, prompts: dict[int, list[int]], new_tokens: int = 4) -> list:
    """Add the requests, run them to the end with a fixed sampled token; the batches."""
    for slot, p in prompts.items():
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        s.add(Request(slot=slot, gen=0, prompt_ids=list(p), params=params, arrival=slot))
    batches = []
    while (b := s.schedule()) is not None:
        batches.append(b)
        s.update(b, Sampled(tuple(5 for it in b.items if it.samples)))
        check_kv_ownership(s)
    return batches


def test_a_hit_skips_exactly_the_cached_tokens_and_maps_them_first():
    s = make_sched()
    shared = list(range(10, 50))
    run(s, {0: shared + [1, 2, 3]})
    (b,) = run(s, {1: shared + [7, 8]}, new_tokens=1)
    (it,) = b.items
    assert it.start == 40 and it.token_ids == (7, 8)  # the 40 shared tokens are not computed again
    assert len(it.prefix_kv_slots) == 40 and s.by_slot.get(1) is None
    assert s.prefix_hit_tokens == 40 and s.prefix_queried_tokens == 43 + 42


def test_the_last_prompt_token_is_always_computed_again():
    s = make_sched()
    p = list(range(20, 60))
    run(s, {0: p})
    req_batches = run(s, {1: p}, new_tokens=2)
    first = req_batches[0].items[0]
    assert first.start == 39 and first.token_ids == (p[-1],) and first.samples
    assert len(first.prefix_kv_slots) == 39


def test_a_follow_up_turn_hits_the_previous_turns_prompt_and_output():
    s = make_sched()
    turn1 = [9] * 30
    run(s, {0: turn1}, new_tokens=6)  # outputs 5 5 5 5 5 5 (the fake sampler's token)
    turn2 = turn1 + [5] * 6 + [11, 12]
    b = run(s, {1: turn2}, new_tokens=1)[0]
    # 30 prompt tokens + 5 outputs whose KV was computed (the 6th was sampled, never fed back)
    assert b.items[0].start == 35


def test_the_prompt_is_cached_as_soon_as_it_is_computed_not_when_its_request_ends():
    s = make_sched(budget=64)
    shared = list(range(100, 140))
    params = SamplingParams(max_new_tokens=50, temperature=0.0)
    s.add(Request(slot=0, gen=0, prompt_ids=shared + [1], params=params, arrival=0))
    b = s.schedule()
    s.update(b, Sampled((5,)))  # request 0 computed its prompt and goes on decoding
    s.add(Request(slot=1, gen=0, prompt_ids=shared + [2], params=params, arrival=1))
    b = s.schedule()
    new = next(it for it in b.items if it.slot == 1)
    assert new.start == 40 and s.by_slot[0] in s.running
    check_kv_ownership(s)


def test_with_the_cache_disabled_nothing_is_reused_or_counted():
    s = make_sched(prefix_cache=False)
    p = list(range(30))
    run(s, {0: p})
    b = run(s, {1: p}, new_tokens=1)[0]
    assert b.items[0].start == 0 and b.items[0].prefix_kv_slots == ()
    assert s.prefix_queried_tokens == s.prefix_hit_tokens == 0
    assert s.by_slot == {} and s.tokens.num_free == s.tokens.capacity


def test_evictable_tokens_count_as_free_capacity_for_admission():
    """A pool full of cached tokens admits a new request by evicting them, without preempting."""
    s = make_sched(kv=128, max_len=64)
    rng = random.Random(8)
    for i in range(6):
        run(s, {i: [rng.randrange(1000) for _ in range(30)]}, new_tokens=2)
    assert s.tokens.num_free < 40 and s.num_free_tokens == 128
    run(s, {99: [rng.randrange(1000) for _ in range(50)]}, new_tokens=10)
    assert s.num_preemptions == 0
