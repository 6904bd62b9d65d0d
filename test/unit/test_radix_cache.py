"""RadixCache over a real TokenToKVPoolAllocator: matching, splitting, locks, LRU eviction, and
the slot accounting (free + held by requests + cached == total)."""

from __future__ import annotations

import random

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import TokenToKVPoolAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

POOL_SIZE = 64


@pytest.fixture
def allocator() -> TokenToKVPoolAllocator:
    return TokenToKVPoolAllocator(POOL_SIZE)


@pytest.fixture
def cache(allocator: TokenToKVPoolAllocator) -> RadixCache:
    return RadixCache(allocator)


def cache_new(cache: RadixCache, allocator: TokenToKVPoolAllocator, key: list[int]) -> torch.Tensor:
    """Allocate fresh slots for `key`, insert them, free the duplicates; return the slots passed."""
    slots = allocator.alloc(len(key))
    assert slots is not None
    num_present = cache.insert(key, slots)
    allocator.free(slots[:num_present])
    return slots


def child_keys(node: TreeNode) -> list[list[int]]:
    return sorted(list(c.key) for c in node.children.values())


def slot_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def test_match_on_empty_tree(cache: RadixCache):
    result = cache.match_prefix([1, 2, 3])
    assert result.indices.dtype == torch.int64 and result.indices.numel() == 0
    assert result.last_node is cache.root
    assert cache.match_prefix([]).last_node is cache.root
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    cache.check_integrity()


def test_match_full_partial_divergent_splits_nodes(cache, allocator):
    slots = cache_new(cache, allocator, [1, 2, 3, 4, 5])

    full = cache.match_prefix([1, 2, 3, 4, 5])
    assert torch.equal(full.indices, slots) and full.last_node.key == [1, 2, 3, 4, 5]
    longer = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert torch.equal(longer.indices, slots) and longer.last_node is full.last_node

    # Ends inside the node: split so last_node covers exactly [1, 2, 3].
    partial = cache.match_prefix([1, 2, 3])
    assert torch.equal(partial.indices, slots[:3])
    assert partial.last_node.key == [1, 2, 3] and child_keys(partial.last_node) == [[4, 5]]
    assert child_keys(cache.root) == [[1, 2, 3]]

    # Diverges inside [1, 2, 3]: a second split.
    divergent = cache.match_prefix([1, 2, 9, 9])
    assert torch.equal(divergent.indices, slots[:2]) and divergent.last_node.key == [1, 2]
    assert child_keys(divergent.last_node) == [[3]]

    assert cache.match_prefix([7, 1, 2]).last_node is cache.root
    assert cache.total_size() == cache.evictable_size() == 5
    assert slot_set(cache.all_slots()) == slot_set(slots)
    cache.check_integrity()


def test_insert_returns_present_prefix_and_caller_frees_duplicates(cache, allocator):
    first = cache_new(cache, allocator, [1, 2, 3, 4])
    assert allocator.available_size() == POOL_SIZE - 4

    # A request that computed [1..6] entirely on its own slots (no prefix hit).
    own = allocator.alloc(6)
    assert cache.insert([1, 2, 3, 4, 5, 6], own) == 4
    allocator.free(own[:4])  # the tree kept `first` for those tokens
    assert allocator.available_size() == POOL_SIZE - 6
    assert torch.equal(cache.match_prefix([1, 2, 3, 4, 5, 6]).indices, torch.cat([first, own[4:]]))

    # A request that reused the cached prefix: value[:prefix_len] are the tree's own slots.
    match = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    prefix_len = len(match.indices)
    value = torch.cat([match.indices, allocator.alloc(1)])
    num_present = cache.insert([1, 2, 3, 4, 5, 6, 7], value)
    assert num_present == prefix_len == 6
    allocator.free(value[prefix_len:num_present])  # nothing: no duplicates
    assert allocator.available_size() + cache.total_size() == POOL_SIZE
    assert cache.insert([1, 2], first[:2].clone()) == 2  # fully present, tree unchanged
    assert cache.total_size() == 7
    cache.check_integrity()


def test_insert_copies_value(cache, allocator):
    row = torch.zeros(8, dtype=torch.int64)
    row[:3] = allocator.alloc(3)
    expected = row[:3].clone()
    cache.insert([1, 2, 3], row[:3])
    row[:] = 0  # the request's row is reused by another request
    assert torch.equal(cache.match_prefix([1, 2, 3]).indices, expected)


def test_lock_protects_from_eviction_and_unlock_releases(cache, allocator):
    cache_new(cache, allocator, [1, 2, 3, 4])
    match = cache.match_prefix([1, 2])  # splits [1, 2] | [3, 4]
    cache.inc_lock_ref(match.last_node)
    assert cache.protected_size() == 2 and cache.evictable_size() == 2
    cache.check_integrity()

    assert cache.evict(100) == 2  # only the unlocked [3, 4] leaf goes
    assert torch.equal(cache.match_prefix([1, 2, 3, 4]).indices, match.indices)
    assert cache.evict(100) == 0
    assert allocator.available_size() == POOL_SIZE - 2

    cache.dec_lock_ref(match.last_node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 2
    assert cache.evict(1) == 2
    assert allocator.available_size() == POOL_SIZE and cache.total_size() == 0
    cache.check_integrity()


def test_split_of_locked_node_keeps_lock_on_both_parts(cache, allocator):
    cache_new(cache, allocator, [1, 2, 3, 4])
    locked = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(locked)
    cache.match_prefix([1, 2])  # splits the locked node above `locked`
    assert locked.key == [3, 4] and locked.parent.lock_ref == 1
    assert cache.protected_size() == 4 and cache.evict(100) == 0
    cache.check_integrity()
    cache.dec_lock_ref(locked)  # must release the new parent too
    assert cache.protected_size() == 0 and cache.evictable_size() == 4
    cache.check_integrity()
    with pytest.raises(AssertionError):
        cache.dec_lock_ref(locked)


def test_evict_lru_over_leaves_and_cascades_to_parents(cache, allocator):
    a = cache_new(cache, allocator, [1, 2, 3])
    b = cache_new(cache, allocator, [1, 2, 4, 5])
    c = cache_new(cache, allocator, [6, 7])
    cache.match_prefix([1, 2, 3])  # refresh A: leaves by age are [4, 5], [6, 7], [3]
    assert child_keys(cache.root) == [[1, 2], [6, 7]]

    def cached() -> set[int]:
        return slot_set(cache.all_slots())

    assert cache.evict(1) == 2 and cached() == slot_set(a) | slot_set(c)
    assert not slot_set(b[2:]) & slot_set(allocator.used_pages())  # B's leaf went back
    assert cache.evict(1) == 2 and cached() == slot_set(a)
    # [3] goes first; its parent [1, 2] is then an unlocked leaf and goes next.
    assert cache.evict(1) == 1 and cached() == slot_set(a[:2])
    assert child_keys(cache.root) == [[1, 2]]
    assert cache.evict(1) == 2 and cache.total_size() == 0
    assert allocator.available_size() == POOL_SIZE
    cache.check_integrity()


def test_evict_more_than_available_frees_all_unlocked(cache, allocator):
    cache_new(cache, allocator, [1, 2, 3])
    cache_new(cache, allocator, [1, 2, 8, 9])
    cache_new(cache, allocator, [5, 6, 7])
    locked = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(locked)
    evictable = cache.evictable_size()
    assert evictable == 5
    assert cache.evict(10**6) == evictable
    assert cache.evictable_size() == 0 and cache.total_size() == cache.protected_size() == 3
    assert allocator.available_size() == POOL_SIZE - 3
    cache.check_integrity()


def brute_force_sizes(cache: RadixCache) -> tuple[int, int]:
    evictable = protected = 0
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        if node.lock_ref > 0:
            protected += len(node.key)
        else:
            evictable += len(node.key)
        stack.extend(node.children.values())
    return evictable, protected


def test_randomized_operations_keep_counters_and_slots_consistent():
    rng = random.Random(0)
    allocator = TokenToKVPoolAllocator(48)
    cache = RadixCache(allocator)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    running: list[tuple[list[int], torch.Tensor, TreeNode, torch.Tensor]] = []

    def random_key() -> list[int]:
        suffix = [rng.randrange(4) for _ in range(rng.randrange(4))]
        return rng.choice(stems)[: rng.randrange(1, 6)] + suffix

    for _ in range(200):
        op = rng.random()
        if op < 0.35:  # admit a request: match, lock, allocate the rest (evicting if short)
            key = random_key()
            match = cache.match_prefix(key)
            evictable_before, unlocked = cache.evictable_size(), cache.unlocked_len(match.last_node)
            cache.inc_lock_ref(match.last_node)
            assert cache.evictable_size() == evictable_before - unlocked, "unlocked_len is what locking takes"
            need = len(key) - len(match.indices)
            if allocator.available_size() < need:
                cache.evict(need - allocator.available_size())
            own = allocator.alloc(need)
            if own is None:
                cache.dec_lock_ref(match.last_node)
            else:
                running.append((key, match.indices, match.last_node, own))
        elif op < 0.65 and running:  # finish a request: cache it, free duplicates, unlock
            key, prefix, node, own = running.pop(rng.randrange(len(running)))
            # The locked prefix must have survived every eviction meanwhile.
            assert torch.equal(cache.match_prefix(key[: len(prefix)]).indices, prefix)
            num_present = cache.insert(key, torch.cat([prefix, own]))
            assert num_present >= len(prefix)
            allocator.free(own[: num_present - len(prefix)])
            cache.dec_lock_ref(node)
        elif op < 0.75 and running:  # abort a request: nothing is cached
            _, _, node, own = running.pop(rng.randrange(len(running)))
            allocator.free(own)
            cache.dec_lock_ref(node)
        elif op < 0.9:
            cache.match_prefix(random_key())  # splits without changing sizes
        else:
            cache.evict(rng.randrange(1, 10))

        cache.check_integrity()
        assert brute_force_sizes(cache) == (cache.evictable_size(), cache.protected_size())
        held = sum(len(r[3]) for r in running)
        assert allocator.available_size() + cache.total_size() + held == allocator.size
        owned = [cache.all_slots()] + [r[3] for r in running]
        assert slot_set(torch.cat(owned)) == slot_set(allocator.used_pages())

    for _, _, node, own in running:
        allocator.free(own)
        cache.dec_lock_ref(node)
    assert cache.protected_size() == 0
    cache.evict(allocator.size)
    assert allocator.available_size() == allocator.size and cache.total_size() == 0


def test_disabled_cache_stores_nothing(allocator):
    cache = RadixCache(allocator, disable=True)
    slots = allocator.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0
    allocator.free(slots)  # the caller frees everything itself
    match = cache.match_prefix([1, 2, 3])
    assert match.indices.numel() == 0 and match.last_node is cache.root
    cache.inc_lock_ref(match.last_node)
    cache.dec_lock_ref(match.last_node)
    assert cache.total_size() == 0 and cache.evict(10) == 0
    assert allocator.available_size() == POOL_SIZE
    cache.check_integrity()


def test_reset_drops_tree_without_freeing(cache, allocator):
    cache_new(cache, allocator, [1, 2, 3])
    cache.inc_lock_ref(cache.match_prefix([1, 2, 3]).last_node)
    cache.reset()
    assert cache.total_size() == cache.protected_size() == 0
    assert cache.match_prefix([1, 2, 3]).last_node is cache.root
    assert allocator.available_size() == POOL_SIZE - 3  # reset alone frees nothing
    allocator.clear()  # flush_cache pairs the two
    assert allocator.available_size() == POOL_SIZE
    cache.check_integrity()


def test_check_integrity_catches_drifted_counter(cache, allocator):
    cache_new(cache, allocator, [1, 2])
    cache._evictable_size += 1
    with pytest.raises(AssertionError):
        cache.check_integrity()
