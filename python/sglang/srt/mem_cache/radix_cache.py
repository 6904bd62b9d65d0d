"""Prefix cache: a radix tree from token-id sequences to the KV slots that hold their KV.

Data structure
--------------
Each edge of the tree is a `TreeNode` whose `key` is a run of token ids and whose `value` holds
the KV slot of each of those tokens (`len(key) == len(value)`). The path from the root to a node
spells a token prefix; the concatenated values of that path are the slots of the prefix. Children
are keyed by the first page of their key (the first token with page size 1), so siblings never
share a first page and a lookup walks one child per edge. The root has an empty key.

Pages: the tree shares whole pages only. Every key is a whole number of pages and its value the
slots of those pages (see memory_pool), a match is truncated to whole pages, and nodes split only
at page boundaries, so a page is never held by two nodes, nor partly by the tree and partly by a
request. Callers insert only the page-aligned part of a request's tokens.

A node is split when a lookup or an insert diverges (or stops) inside its key: the first part
becomes a new parent, so every matched prefix ends exactly on a node boundary and that node can be
returned, locked and later extended.

Slot ownership
--------------
A slot is in exactly one place: free in the allocator, owned by a running request, or held by the
tree. `insert` hands slots to the tree; `evict` gives them back to the allocator. `reset` forgets
the tree without freeing anything, because it is only used together with `allocator.clear()`.

Locks and eviction
------------------
A running request locks the node that ends its matched prefix (`inc_lock_ref`), which increments
`lock_ref` on that node and on every ancestor, so a node's `lock_ref` counts the requests using it
or anything below it. Tokens in nodes with `lock_ref > 0` are *protected*; the rest are
*evictable*. Both sizes are counters updated when a node's `lock_ref` crosses zero, because the
scheduler reads them every step. The root is pinned (`lock_ref` 1, never changed) and holds no
tokens.

`evict` removes unlocked leaves, least recently used first, and a parent that becomes an unlocked
leaf joins the candidates. Access times come from a counter bumped once per `match_prefix` /
`insert`, stamped on every node of the walked path, so a parent is never older than its children.

Typical request flow (the scheduler's side):
    match = cache.match_prefix(tokens); cache.inc_lock_ref(match.last_node)
    ... allocate slots for tokens[len(match.indices):], run the model ...
    n = cache.insert(tokens, slots)                 # slots = cat(match.indices, own slots)
    allocator.free(slots[len(match.indices):n])     # duplicates another request cached meanwhile
    cache.dec_lock_ref(match.last_node)
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from sglang.srt.mem_cache.memory_pool import TokenToKVPoolAllocator, check_page_layout


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


class TreeNode:
    """One edge of the radix tree: a run of tokens and their KV slots."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access_time")

    def __init__(
        self,
        key: list[int],
        value: torch.Tensor,
        parent: Optional[TreeNode],
        last_access_time: int,
        lock_ref: int = 0,
    ):
        # Keyed by the first page of the child's key (`RadixCache._child_key`).
        self.children: dict[int | tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value  # int64 slots, [len(key)]
        self.lock_ref = lock_ref
        self.last_access_time = last_access_time

    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"TreeNode(key={self.key}, lock_ref={self.lock_ref}, t={self.last_access_time})"


@dataclass
class MatchResult:
    """The longest cached prefix of a key."""

    indices: torch.Tensor  # int64 KV slots of the matched prefix, [prefix_len]
    last_node: TreeNode  # deepest node of the match (root if none); lock it to keep the prefix

    def __post_init__(self) -> None:
        assert self.indices.dtype == torch.int64 and self.indices.dim() == 1


def _common_prefix_len(node_key: list[int], key: Sequence[int], start: int, end: int) -> int:
    """Length of the common prefix of `node_key` and `key[start:end]`, without slicing `key`."""
    limit = min(len(node_key), end - start)
    i = 0
    while i < limit and node_key[i] == key[start + i]:
        i += 1
    return i


class RadixCache:
    """Token-prefix -> KV-slot cache over a `TokenToKVPoolAllocator`, in whole pages."""

    def __init__(self, allocator: TokenToKVPoolAllocator, disable: bool = False):
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.disable = disable
        self.reset()

    def reset(self) -> None:
        """Forget every node WITHOUT freeing its slots.

        Only correct together with `allocator.clear()` (flush_cache), which reclaims all slots at
        once; calling it alone leaks every slot the tree held.
        """
        self._clock = 0
        # Pinned: lock_ref 1 keeps it out of eviction without special cases there.
        self.root = TreeNode([], _empty_slots(), parent=None, last_access_time=0, lock_ref=1)
        self._evictable_size = 0
        self._protected_size = 0

    # ---- lookup and insertion -------------------------------------------------------------

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `key` in whole pages, and the node that ends it.

        Splits the last node when the match ends inside it, so `last_node` covers exactly the
        match, and refreshes the access time of every node on the path.
        """
        end = self.page_aligned(len(key))
        if self.disable or end == 0:
            return MatchResult(_empty_slots(), self.root)
        now = self._tick()
        node, pos = self.root, 0
        values: list[torch.Tensor] = []
        while pos < end:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self.page_aligned(_common_prefix_len(child.key, key, pos, end))
            partial = n < len(child.key)
            if partial:
                child = self._split(child, n)
            child.last_access_time = now  # after the split: the unmatched rest was not used
            values.append(child.value)
            node, pos = child, pos + n
            if partial:
                break
        indices = torch.cat(values) if values else _empty_slots()
        return MatchResult(indices, node)

    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Cache `value[i]` as the slot of token `key[i]`; return how many leading tokens were
        already cached.

        `key` must be whole pages (callers keep or free the slots of a request's unaligned tail).
        For those first `n` tokens (the return value, whole pages) the tree keeps its own slots
        and ignores `value[:n]`; only `value[n:]` passes to the tree. The caller must therefore
        free every slot in `value[:n]` that it allocated itself: if `value` starts with the `k`
        slots it got from `match_prefix`, those are the tree's own and it frees `value[k:n]`. When
        the cache is disabled nothing is stored, 0 is returned, and the caller frees all of `value`.

        `value` is copied, because callers often pass a view of a `ReqToTokenPool` row that is
        overwritten when the row is reused.
        """
        assert len(key) == len(value), f"{len(key)} tokens but {len(value)} slots"
        assert len(key) % self.page_size == 0, f"{len(key)} tokens are not whole pages of {self.page_size}"
        if self.disable:
            return 0
        now = self._tick()
        node, pos = self.root, 0
        while pos < len(key):
            child_key = self._child_key(key, pos)
            child = node.children.get(child_key)
            if child is None:
                leaf = TreeNode(list(key[pos:]), value[pos:].clone(), node, now)
                node.children[child_key] = leaf
                self._evictable_size += len(leaf.key)
                return pos
            n = self.page_aligned(_common_prefix_len(child.key, key, pos, len(key)))
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            node, pos = child, pos + n
        return pos

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut `node` after `n` tokens; return the new parent holding the first `n`.

        The new parent takes the node's `lock_ref`: whatever locked the node also locked all of
        its ancestors, which now include the new parent. Sizes do not change, because both parts
        keep the same lock state.
        """
        assert 0 < n < len(node.key) and n % self.page_size == 0
        parent = node.parent
        assert parent is not None
        prefix = TreeNode(node.key[:n], node.value[:n], parent, node.last_access_time, lock_ref=node.lock_ref)
        prefix.children[self._child_key(node.key, n)] = node
        parent.children[self._child_key(node.key, 0)] = prefix
        node.key, node.value, node.parent = node.key[n:], node.value[n:], prefix
        return prefix

    def page_aligned(self, num_tokens: int) -> int:
        """`num_tokens` rounded down to whole pages: the part of a sequence the tree can share."""
        return num_tokens - num_tokens % self.page_size

    def _child_key(self, key: Sequence[int], pos: int) -> int | tuple[int, ...]:
        # The first page, because matches stop at page boundaries: two siblings may share a first
        # token but never a first page. Page size 1 keeps plain ints (cheaper to hash).
        return key[pos] if self.page_size == 1 else tuple(key[pos : pos + self.page_size])

    def _tick(self) -> int:
        # A counter rather than a clock: no ties between operations, and tests are deterministic.
        self._clock += 1
        return self._clock

    # ---- locking and eviction -------------------------------------------------------------

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect the prefix ending at `node` from eviction (node and all ancestors)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlocked_len(self, node: TreeNode) -> int:
        """Tokens on the path to `node` that no request locks: what `inc_lock_ref(node)` would
        take out of the evictable size."""
        n = 0
        while node is not self.root and node.lock_ref == 0:
            n += len(node.key)
            node = node.parent  # type: ignore[assignment]
        return n

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one `inc_lock_ref(node)`; nodes nobody else locks become evictable."""
        while node is not self.root:
            assert node.lock_ref > 0, f"unbalanced dec_lock_ref on {node}"
            if node.lock_ref == 1:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots if that many are evictable; return the number freed.

        Removes unlocked leaves oldest-access first; a parent left as an unlocked childless node
        becomes a candidate in turn. The candidate heap is built from a walk of the tree: eviction
        only runs when the allocator is short, so keeping a heap current on every access would
        cost more than it saves.
        """
        if self.disable or num_tokens <= 0:
            return 0
        order = itertools.count()  # tie-breaker, so the heap never compares nodes
        heap = [
            (node.last_access_time, next(order), node) for node in self._walk() if node.is_leaf() and node.lock_ref == 0
        ]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.allocator.free(node.value)
            freed += len(node.key)
            self._evictable_size -= len(node.key)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None
            # The root is pinned (lock_ref 1), so it never qualifies here.
            if parent.is_leaf() and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, next(order), parent))
        return freed

    # ---- sizes and checks -----------------------------------------------------------------

    def evictable_size(self) -> int:
        """Tokens in unlocked nodes: what `evict` could free right now."""
        return self._evictable_size

    def protected_size(self) -> int:
        """Tokens in nodes locked by running requests."""
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def _walk(self) -> Iterator[TreeNode]:
        """Every node except the root, parents before children (iterative: chains can be deep)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def all_slots(self) -> torch.Tensor:
        """Every slot the tree holds, in no particular order (for pool integrity checks)."""
        values = [node.value for node in self._walk()]
        return torch.cat(values) if values else _empty_slots()

    def check_integrity(self) -> None:
        """Assert the tree's structural invariants and that the size counters agree with it."""
        assert self.root.parent is None and not self.root.key and self.root.lock_ref == 1
        evictable = protected = 0
        for node in self._walk():
            parent = node.parent
            assert parent is not None and parent.children.get(self._child_key(node.key, 0)) is node, node
            assert len(node.key) > 0 and len(node.key) == len(node.value), node
            assert len(node.key) % self.page_size == 0, node
            assert node.value.dtype == torch.int64, node
            check_page_layout(node.value, self.page_size)
            assert node.lock_ref >= 0, node
            if node.lock_ref > 0:
                protected += len(node.key)
                # Each lock on a descendant also counts once on this node.
                assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), node
                assert parent is self.root or parent.lock_ref > 0, f"{node} locked under {parent}"
            else:
                evictable += len(node.key)
        assert evictable == self._evictable_size, (evictable, self._evictable_size)
        assert protected == self._protected_size, (protected, self._protected_size)
        slots = self.all_slots()
        assert len(slots) == self.total_size()
        assert len(torch.unique(slots)) == len(slots), "a slot is held by two tree positions"
