"""KV memory in pages (--page-size): the paged allocator, the page-aligned radix cache, and the
KVCacheManager moving whole pages between requests, the tree and the free list."""

from __future__ import annotations

import random

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager
from sglang.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    check_page_layout,
    slots_needed,
)
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

PS = 4


def pages(slots: torch.Tensor, page_size: int = PS) -> list[int]:
    return sorted(set((slots // page_size).tolist()))


# ---- allocator ---------------------------------------------------------------------------


def test_slots_needed_counts_whole_new_pages():
    assert slots_needed(0, 1, 4) == 4
    assert slots_needed(0, 4, 4) == 4
    assert slots_needed(3, 4, 4) == 0  # the last page has room
    assert slots_needed(4, 5, 4) == 4
    assert slots_needed(5, 13, 4) == 8
    assert slots_needed(7, 9, 1) == 2
    assert torch.equal(slots_needed(torch.tensor([0, 3, 4]), torch.tensor([1, 4, 9]), 4), torch.tensor([4, 0, 8]))


def test_page_size_one_hands_out_slots_as_before():
    allocator = TokenToKVPoolAllocator(8)
    assert allocator.alloc(3).tolist() == [6, 7, 8]
    # alloc_extend with pages of one slot is plain alloc of the total, in request order
    got = allocator.alloc_extend(torch.tensor([0, 5]), torch.tensor([2, 6]), torch.tensor([0, 0]))
    assert got.tolist() == [3, 4, 5]
    allocator.free(torch.tensor([4, 3]))
    assert allocator.alloc(2).tolist() == [4, 3]  # freed slots come back first, in order
    assert allocator.available_size() == 2


def test_alloc_hands_out_whole_pages_never_page_zero():
    allocator = TokenToKVPoolAllocator(4 * PS, PS)
    assert allocator.num_pages == 4 and allocator.available_size() == 16
    slots = allocator.alloc(2 * PS)
    assert slots.numel() == 8 and len(pages(slots)) == 2 and 0 not in pages(slots)
    check_page_layout(slots, PS)
    assert allocator.available_size() == 8
    assert allocator.alloc(3 * PS) is None and allocator.available_size() == 8  # nothing taken
    with pytest.raises(AssertionError):
        allocator.alloc(3)  # not whole pages
    rest = allocator.alloc(2 * PS)
    assert sorted(pages(slots) + pages(rest)) == [1, 2, 3, 4]


def test_alloc_extend_fills_the_last_page_before_taking_new_ones():
    allocator = TokenToKVPoolAllocator(8 * PS, PS)
    first = allocator.alloc_extend(torch.tensor([0, 0]), torch.tensor([6, 3]), torch.tensor([0, 0]))
    a, b = first[:6], first[6:]
    assert len(pages(a)) == 2 and len(pages(b)) == 1 and not set(pages(a)) & set(pages(b))
    check_page_layout(a, PS)
    check_page_layout(b, PS)
    assert allocator.available_size() == 5 * PS
    # a: 6 -> 9 tokens fills slots 6, 7 of its second page, then one new page; b: 3 -> 4 takes none
    more = allocator.alloc_extend(torch.tensor([6, 3]), torch.tensor([9, 4]), torch.stack([a[5], b[2]]))
    row_a, row_b = torch.cat([a, more[:3]]), torch.cat([b, more[3:]])
    check_page_layout(row_a, PS)
    check_page_layout(row_b, PS)
    assert len(pages(row_a)) == 3 and pages(row_b) == pages(b)
    assert allocator.available_size() == 4 * PS
    # too few pages: None, and nothing taken
    assert allocator.alloc_extend(torch.tensor([0]), torch.tensor([5 * PS]), torch.tensor([0])) is None
    assert allocator.available_size() == 4 * PS


def test_free_returns_whole_pages_and_catches_double_frees():
    allocator = TokenToKVPoolAllocator(4 * PS, PS)
    slots = allocator.alloc_extend(torch.tensor([0]), torch.tensor([6]), torch.tensor([0]))
    allocator.free(slots[4:6])  # the partial last page: two slots, one page
    assert allocator.available_size() == 3 * PS
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free(slots[5:6])
    allocator.free(slots[:4])
    assert allocator.available_size() == 4 * PS and allocator.used_pages().numel() == 0
    two = allocator.alloc(2 * PS)
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free(torch.cat([two, two[:1]]))  # one call naming a page twice


def test_kv_pool_is_flashinfers_paged_layout():
    pool = MHATokenToKVPool(3 * PS, torch.float32, num_kv_heads=2, head_dim=8, layer_num=1, page_size=PS)
    k = pool.k_buffer[0]
    assert k.shape == (4 * PS, 2, 8)
    paged = k.view(pool.num_pages + 1, PS, 2, 8)
    assert bool((paged[0] == 0).all())  # the padding page
    pool.set_kv_buffer(0, torch.tensor([2 * PS + 1]), torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    assert bool((paged[2, 1] == 1).all())  # slot s is page s // PS, offset s % PS


# ---- radix cache in pages ----------------------------------------------------------------


@pytest.fixture
def allocator() -> TokenToKVPoolAllocator:
    return TokenToKVPoolAllocator(16 * PS, PS)


@pytest.fixture
def cache(allocator) -> RadixCache:
    return RadixCache(allocator)


def cache_new(cache: RadixCache, allocator: TokenToKVPoolAllocator, key: list[int]) -> torch.Tensor:
    slots = allocator.alloc(len(key))
    num_present = cache.insert(key, slots)
    allocator.free(slots[:num_present])
    return slots


def test_match_is_truncated_to_whole_pages(cache, allocator):
    key = list(range(100, 112))  # three pages
    slots = cache_new(cache, allocator, key)
    assert torch.equal(cache.match_prefix(key).indices, slots)
    assert torch.equal(cache.match_prefix(key[:11]).indices, slots[:8])  # 11 tokens: two pages
    assert cache.match_prefix(key[:3]).indices.numel() == 0
    diverging = key[:6] + [0] * 6  # differs inside the second page
    match = cache.match_prefix(diverging)
    assert torch.equal(match.indices, slots[:4]) and len(match.last_node.key) == 4  # split at a page
    cache.check_integrity()


def test_siblings_may_share_a_first_token_but_not_a_first_page(cache, allocator):
    a = cache_new(cache, allocator, [1, 2, 3, 4, 5, 6, 7, 8])
    b = cache_new(cache, allocator, [1, 2, 9, 9, 5, 6, 7, 8])
    assert len(cache.root.children) == 2
    assert torch.equal(cache.match_prefix([1, 2, 3, 4, 0, 0, 0, 0]).indices, a[:4])
    assert torch.equal(cache.match_prefix([1, 2, 9, 9, 5, 6, 7, 8]).indices, b)
    cache.check_integrity()


def test_insert_takes_whole_pages_and_reports_the_cached_part(cache, allocator):
    with pytest.raises(AssertionError, match="whole pages"):
        cache.insert([1, 2, 3], allocator.alloc(PS)[:3])
    first = cache_new(cache, allocator, list(range(8)))
    second = allocator.alloc(12)
    assert cache.insert(list(range(6)) + [50, 51] + [60, 61, 62, 63], second) == 4
    allocator.free(second[:4])  # the duplicate page; the rest now belongs to the tree
    assert cache.total_size() == 16
    assert torch.equal(cache.match_prefix(list(range(8))).indices, first)
    cache.check_integrity()


def test_eviction_frees_whole_pages(cache, allocator):
    cache_new(cache, allocator, list(range(8)))
    cache_new(cache, allocator, list(range(20, 32)))
    locked = cache.match_prefix(list(range(20, 32)))
    cache.inc_lock_ref(locked.last_node)
    free_before = allocator.available_size()
    assert cache.evict(1) == 8  # the whole unlocked leaf: two pages
    assert allocator.available_size() == free_before + 8
    assert cache.evict(100) == 0  # the rest is locked
    assert sorted(allocator.used_pages().tolist()) == pages(locked.indices)
    cache.dec_lock_ref(locked.last_node)
    cache.check_integrity()


# ---- the manager: requests, tree and allocator together ----------------------------------


def make_manager(num_pages: int, page_size: int = PS, rows: int = 8) -> KVCacheManager:
    allocator = TokenToKVPoolAllocator(num_pages * page_size, page_size)
    pool = MHATokenToKVPool(num_pages * page_size, torch.float32, 1, 1, 1, page_size=page_size)
    return KVCacheManager(ReqToTokenPool(rows, 256), allocator, pool)


def make_req(rid: str, ids: list[int]) -> Req:
    params = SamplingParams(temperature=0, max_new_tokens=64)
    params.normalize()
    return Req(rid, ids, params, seed=0)


def run_prefill(kv: KVCacheManager, req: Req, n: int) -> None:
    assert kv.alloc_extend([(req, n)]) is not None
    req.kv_len += n


def test_release_caches_the_aligned_part_and_frees_the_tail():
    kv = make_manager(8)
    prompt = list(range(1, 12))  # 11 tokens: two whole pages and a tail of three
    a = make_req("a", prompt)
    assert kv.start(a) and a.prefix_len == 0
    run_prefill(kv, a, 11)
    kv.check_integrity([a])
    kv.cache_prompt(a)  # shares 8 tokens; the tail's page stays a's
    assert a.prefix_len == 8 and kv.tree.total_size() == 8
    kv.check_integrity([a])
    b = make_req("b", prompt + [99])
    assert kv.prefix_match_len(b) == 8
    kv.release(a)
    assert kv.tree.total_size() == 8 and kv.allocator.available_size() == 6 * PS
    kv.check_integrity([])


def test_cache_off_frees_every_page():
    kv = make_manager(4)
    kv.tree.disable = True
    a = make_req("a", list(range(1, 7)))
    kv.start(a)
    run_prefill(kv, a, 6)
    kv.release(a)
    assert kv.allocator.available_size() == 4 * PS
    kv.check_integrity([])


@pytest.mark.parametrize("page_size", [1, 4])
def test_random_requests_keep_every_page_in_one_place(page_size):
    """Requests sharing prefixes start, prefill in chunks, decode, share their prompt, finish or
    get retracted in random order, on a pool small enough to evict; every page stays in exactly
    one place and a flush returns them all."""
    rng = random.Random(page_size)
    kv = make_manager(24 if page_size > 1 else 96, page_size)
    stems = [[rng.randrange(1, 50) for _ in range(rng.randrange(3, 20))] for _ in range(4)]
    running: list[Req] = []
    for step in range(300):
        op = rng.random()
        if op < 0.3 and kv.req_to_token_pool.available_size():
            stem = rng.choice(stems)
            req = make_req(
                f"r{step}",
                stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(1, 50) for _ in range(rng.randrange(4))],
            )
            if (
                kv.slots_needed(kv.prefix_match_len(req), len(req.fill_ids)) + kv.prefix_match_len(req)
                <= kv.available_size()
            ):
                assert kv.start(req) and req.prefix_len % page_size == 0
                running.append(req)
        elif op < 0.75 and running:
            req = rng.choice(running)
            missing = len(req.fill_ids) - req.kv_len
            n = min(missing, rng.randrange(1, 6)) if missing > 0 else 1
            if missing == 0:
                req.output_ids.append(rng.randrange(1, 50))  # a decode feeds the new token back
            if kv.slots_needed(req.kv_len, req.kv_len + n) <= kv.available_size():
                run_prefill(kv, req, n)
                kv.cache_prompt(req)
            elif missing == 0:
                req.output_ids.pop()
        elif running:
            kv.release(running.pop(rng.randrange(len(running))))
        kv.check_integrity(running)
        for req in running:
            check_page_layout(kv.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len], page_size)
    for req in running:
        kv.release(req)
    kv.check_integrity([])
    assert kv.flush() and kv.allocator.available_size() == kv.total_tokens


def test_page_size_flag_defaults_and_validation():
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert ServerArgs.from_cli_args(parser.parse_args([])).page_size == 1
    assert ServerArgs.from_cli_args(parser.parse_args(["--page-size", "16"])).page_size == 16
    with pytest.raises(ValueError, match="--page-size must be >= 1"):
        ServerArgs(page_size=0).resolve()
    with pytest.raises(ValueError, match="--max-total-tokens must hold at least one page"):
        ServerArgs(page_size=16, max_total_tokens=8).resolve()
