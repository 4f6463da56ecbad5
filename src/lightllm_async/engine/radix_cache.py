"""The prefix cache: a radix tree over token ids whose nodes hold KV token slots. Plain Python.

A node's edge is a run of token ids and the KV slots computed for them, in the context of the
tokens on the path above it. A slot is always in exactly one place: the `TokenPool`'s free list,
a running request's private tail, or a node of this tree. A running request locks the path of
the prefix it reuses (a reference count on every node of the path), so a node with a count is
never evicted; unreferenced leaves are evicted in LRU order when the pool needs room, and every
unreferenced token counts as free capacity, since a leaf at a time all of them can be evicted.

Operations cost the length of the match in C-speed list comparisons plus the depth of the path
in Python steps; eviction pops a heap of the evictable leaves that is kept as they change (stale
entries are skipped when popped and dropped when they outnumber the live ones).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from lightllm_async.engine.kv_pool import TokenPool


class Node:
    """An edge of the tree: `key` (token ids) and `slots` (their KV slots), of equal length."""

    __slots__ = ("parent", "children", "key", "slots", "refs", "last_access", "serial")

    def __init__(self, parent: Node | None, key: list[int], slots: list[int], serial: int):
        self.parent = parent
        self.children: dict[int, Node] = {}  # by the first token of the child's key
        self.key = key
        self.slots = slots
        self.refs = 0  # running requests whose locked path passes through this node
        self.last_access = 0
        self.serial = serial  # creation order: breaks LRU ties the same way every run


def _common_prefix(key: list[int], tokens: list[int], start: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:]`, by bisection on slice equality
    (each probe a C-speed comparison) rather than a Python loop over the tokens."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start : start + n]:
        return n
    lo, hi = 0, n - 1  # key[:lo] matches, key[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[:mid] == tokens[start : start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixCache:
    """Cached prefixes over `pool`: `match_prefix` finds one, `lock`/`unlock` pin it for a request,
    `insert` takes a request's computed slots, `evict` hands unreferenced ones back to the pool."""

    enabled = True

    def __init__(self, pool: TokenPool):
        self.pool = pool
        self._serials = itertools.count()
        self._clock = 0
        self.root = Node(None, [], [], next(self._serials))
        self.root.refs = 1  # never evicted, never counted
        self.num_tokens = 0  # slots held by the tree
        self.num_evictable = 0  # slots of unreferenced nodes: free capacity
        self._leaves: set[Node] = set()  # unreferenced nodes without children: eviction candidates
        # (last_access, serial, node) for every candidate, plus stale entries of nodes that have
        # since been locked, given a child, evicted or touched again
        self._heap: list[tuple[int, int, Node]] = []

    # -- lookup ---------------------------------------------------------------------------------

    def probe(self, tokens: list[int]) -> tuple[int, int]:
        """(hit, pinned): the length of the cached prefix of `tokens`, and how many of its slots
        are unreferenced now, so that locking it would take them from the free capacity. Changes
        nothing (no split, no LRU touch): admission asks this of a request it may not admit."""
        node, hit, pinned = self.root, 0, 0
        while hit < len(tokens):
            child = node.children.get(tokens[hit])
            if child is None:
                break
            k = _common_prefix(child.key, tokens, hit)
            hit += k
            pinned += k if child.refs == 0 else 0
            if k < len(child.key):
                break
            node = child
        return hit, pinned

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        """The slots of the longest cached prefix of `tokens` and the node that ends exactly there
        (a node the match ends inside is split). The path counts as used now, for LRU."""
        self._clock += 1
        node, hit, slots = self.root, 0, []
        while hit < len(tokens):
            child = node.children.get(tokens[hit])
            if child is None:
                break
            k = _common_prefix(child.key, tokens, hit)
            if k < len(child.key):
                child = self._split(child, k)
            self._touch(child)
            slots += child.slots
            hit += k
            node = child
        return slots, node

    # -- ownership ------------------------------------------------------------------------------

    def insert(self, tokens: list[int], slots: list[int]) -> tuple[int, Node]:
        """Cache `slots` as the KV of `tokens`. Returns (m, node): the tree already held the first
        m tokens, and `slots[:m]` stay the caller's (the tree's own slots, or duplicates of them
        that the caller frees); the tree took `slots[m:]`. `node` ends at len(tokens)."""
        self._clock += 1
        node, i, n = self.root, 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                self._add_leaf(node, tokens[i:], slots[i:n])
                return i, node.children[tokens[i]]
            k = _common_prefix(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)
            self._touch(child)
            i += k
            node = child
        return n, node

    def lock(self, node: Node) -> None:
        """A running request uses the prefix ending at `node`: pin the path."""
        while node is not self.root:
            if node.refs == 0:
                self.num_evictable -= len(node.key)
                self._leaves.discard(node)
            node.refs += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.refs <= 0:
                raise RuntimeError("prefix cache: unlock of an unlocked node")
            node.refs -= 1
            if node.refs == 0:
                self.num_evictable += len(node.key)
                if not node.children:
                    self._add_candidate(node)
            node = node.parent

    def evict(self, n: int) -> int:
        """Free at least `n` slots back to the pool, least recently used leaves first (a parent
        left childless becomes a candidate in turn); fewer only if the tree has no more to give.
        Returns the number freed."""
        freed = 0
        while freed < n and self._leaves:
            access, _, leaf = heapq.heappop(self._heap)
            if leaf in self._leaves and access == leaf.last_access:
                self._remove_leaf(leaf)
                freed += len(leaf.slots)
        return freed

    # -- inspection (tests, stats) --------------------------------------------------------------

    def nodes(self) -> Iterator[Node]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def path_slots(self, node: Node) -> list[int]:
        """The slots of the prefix that ends at `node`, in position order."""
        parts = []
        while node is not self.root:
            parts.append(node.slots)
            node = node.parent
        return [s for part in reversed(parts) for s in part]

    # -- structure ------------------------------------------------------------------------------

    def _split(self, child: Node, k: int) -> Node:
        """Cut `child`'s edge after k tokens; the new upper node takes its place and its counts
        (every lock through the child passes through it)."""
        mid = Node(child.parent, child.key[:k], child.slots[:k], next(self._serials))
        mid.refs, mid.last_access = child.refs, child.last_access
        child.parent.children[child.key[0]] = mid
        child.key, child.slots, child.parent = child.key[k:], child.slots[k:], mid
        mid.children[child.key[0]] = child
        return mid

    def _add_leaf(self, parent: Node, key: list[int], slots: list[int]) -> None:
        leaf = Node(parent, key, slots, next(self._serials))
        leaf.last_access = self._clock
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._add_candidate(leaf)
        self.num_tokens += len(key)
        self.num_evictable += len(key)

    def _remove_leaf(self, leaf: Node) -> None:
        parent = leaf.parent
        del parent.children[leaf.key[0]]
        self._leaves.discard(leaf)
        self.num_tokens -= len(leaf.key)
        self.num_evictable -= len(leaf.key)
        self.pool.free(leaf.slots)
        if parent is not self.root and parent.refs == 0 and not parent.children:
            self._add_candidate(parent)

    def _touch(self, node: Node) -> None:
        node.last_access = self._clock
        if node in self._leaves:
            self._push(node)

    def _add_candidate(self, node: Node) -> None:
        self._leaves.add(node)
        self._push(node)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._heap, (node.last_access, node.serial, node))
        if len(self._heap) > 2 * len(self._leaves) + 64:  # mostly stale: rebuild from the live ones
            self._heap = [(n.last_access, n.serial, n) for n in self._leaves]
            heapq.heapify(self._heap)


class NoPrefixCache:
    """`--disable-prefix-cache`: the same interface, caching nothing. `insert` takes every slot
    by handing it straight back to the pool, so the scheduler frees the same way either way."""

    enabled = False
    num_tokens = 0
    num_evictable = 0

    def __init__(self, pool: TokenPool):
        self.pool = pool

    def probe(self, tokens: list[int]) -> tuple[int, int]:
        return 0, 0

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], None]:
        return [], None

    def insert(self, tokens: list[int], slots: list[int]) -> tuple[int, None]:
        self.pool.free(slots[: len(tokens)])
        return 0, None

    def lock(self, node: None) -> None:
        pass

    def unlock(self, node: None) -> None:
        pass

    def evict(self, n: int) -> int:
        return 0
