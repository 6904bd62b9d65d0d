"""The KV memory of one rank seen from the scheduler: rows, slots, and the prefix cache.

It owns the request-to-token table, the slot allocator, the KV pool and the radix cache, and
moves a request's slots between them: `start` gives a request its row and locks its cached prefix,
`alloc_extend` gives it slots for the tokens a step computes (evicting cached leaves when the
allocator runs short), and `release` hands everything back, the computed tokens to the cache.

With pages (see memory_pool) the tree takes only the page-aligned part of a request's tokens; the
slots of the unaligned tail share a page nobody else uses, so the request keeps them (after
`cache_prompt`) or frees them (`release`). A matched prefix is whole pages, so a request's own
tokens always start on a fresh page.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from sglang.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    check_page_layout,
    pages_of,
    slots_needed,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode


class KVCacheReq(Protocol):
    """What the manager reads and writes on a request (managers.schedule_batch.Req has it all);
    defined here so that mem_cache never imports the scheduler's package above it."""

    rid: str
    origin_input_ids: list[int]
    # KV state, written by the manager; valid while the request holds a req_to_token row
    req_pool_idx: Optional[int]
    prefix_len: int
    kv_len: int
    last_node: Optional[TreeNode]

    @property
    def fill_ids(self) -> list[int]: ...

    def max_prefix_len(self) -> int: ...


class KVCacheManager:
    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool,
        allocator: TokenToKVPoolAllocator,
        kv_pool: MHATokenToKVPool,
        disable_radix_cache: bool = False,
    ):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.kv_pool = kv_pool
        self.tree = RadixCache(allocator, disable=disable_radix_cache)

    @property
    def total_tokens(self) -> int:
        return self.allocator.size

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    def slots_needed(self, kv_len: int, seq_len: int) -> int:
        """Slots a request with `kv_len` tokens of KV takes to reach `seq_len` (whole pages: up to
        page_size - 1 more than the tokens, none while its last page has room)."""
        return slots_needed(kv_len, seq_len, self.page_size)

    def available_size(self) -> int:
        """Slots a step can get: free ones plus cached ones nobody is using."""
        return self.allocator.available_size() + self.tree.evictable_size()

    def used_tokens(self) -> int:
        return self.total_tokens - self.available_size()

    def prefix_match_len(self, req: KVCacheReq) -> int:
        """How many tokens of a waiting request the cache could serve now (for scheduling order)."""
        return len(self.tree.match_prefix(req.fill_ids[: req.max_prefix_len()]).indices)

    def prefix_match(self, req: KVCacheReq) -> tuple[int, int]:
        """(tokens of a waiting request the cache could serve now, how many of those `start`
        would lock that no running request locks already): starting it takes the second out of
        `available_size`, since locked slots cannot be evicted."""
        match = self.tree.match_prefix(req.fill_ids[: req.max_prefix_len()])
        return len(match.indices), self.tree.unlocked_len(match.last_node)

    def start(self, req: KVCacheReq) -> bool:
        """Gives a request its row and locks its prefix; False when no row is free."""
        row = self.req_to_token_pool.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        match = self.tree.match_prefix(req.fill_ids[: req.max_prefix_len()])
        req.prefix_len = req.kv_len = len(match.indices)
        req.last_node = match.last_node
        self.tree.inc_lock_ref(match.last_node)
        self.req_to_token_pool.write(row, 0, match.indices)
        return True

    def alloc_extend(self, reqs_and_lens: Sequence[tuple[KVCacheReq, int]]) -> Optional[torch.Tensor]:
        """Slots for `n` new tokens of each request, written into their rows; None if memory is short."""
        needed = sum(self.slots_needed(req.kv_len, req.kv_len + n) for req, n in reqs_and_lens)
        if self.allocator.available_size() < needed:
            self.tree.evict(needed - self.allocator.available_size())
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)
        kv_lens = as_long([req.kv_len for req, _ in reqs_and_lens])
        rows = as_long([req.req_pool_idx for req, _ in reqs_and_lens])
        # the slot of each request's newest token names its last page (read only when not full)
        last_slots = self.req_to_token_pool.req_to_token[rows, (kv_lens - 1).clamp(min=0)].cpu()
        slots = self.allocator.alloc_extend(kv_lens, kv_lens + as_long([n for _, n in reqs_and_lens]), last_slots)
        if slots is None:
            return None
        offset = 0
        for req, n in reqs_and_lens:
            self.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slots[offset : offset + n])
            offset += n
        return slots

    def cache_prompt(self, req: KVCacheReq) -> None:
        """Shares a request's just-computed prompt through the prefix cache while it decodes,
        so requests arriving meanwhile with the same prefix reuse it."""
        n = self.tree.page_aligned(len(req.origin_input_ids))  # the tail's page stays the request's
        if self.tree.disable or req.kv_len != len(req.origin_input_ids) or req.prefix_len >= n:
            return
        row = req.req_pool_idx
        slots = self.req_to_token_pool.req_to_token[row, :n]
        inserted = self.tree.insert(req.origin_input_ids[:n], slots)
        self.allocator.free(slots[req.prefix_len : max(inserted, req.prefix_len)])  # held by the tree already
        match = self.tree.match_prefix(req.origin_input_ids[:n])
        self.req_to_token_pool.write(row, 0, match.indices)  # the tree's slots replace freed duplicates
        self.tree.inc_lock_ref(match.last_node)
        self.tree.dec_lock_ref(req.last_node)
        req.prefix_len, req.last_node = n, match.last_node

    def release(self, req: KVCacheReq) -> None:
        """Returns a request's row; its computed tokens go to the prefix cache (or are freed)."""
        if req.req_pool_idx is None:
            return
        row = req.req_pool_idx
        slots = self.req_to_token_pool.req_to_token[row, : req.kv_len]
        cached = 0 if self.tree.disable else self.tree.page_aligned(req.kv_len)
        inserted = self.tree.insert(req.fill_ids[:cached], slots[:cached])
        # The tree already held [prefix_len, inserted) from another request: ours are duplicates.
        self.allocator.free(slots[req.prefix_len : max(inserted, req.prefix_len)])
        self.allocator.free(slots[cached:])  # the unaligned tail (everything without a cache)
        self.tree.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(row)
        req.req_pool_idx = None
        req.last_node = None
        req.prefix_len = req.kv_len = 0

    def flush(self) -> bool:
        """Drops the whole prefix cache; refused (False) while any request holds KV."""
        if self.req_to_token_pool.available_size() != self.req_to_token_pool.size:
            return False
        self.tree.reset()
        self.allocator.clear()
        return True

    def check_integrity(self, running: Sequence[KVCacheReq]) -> None:
        """free + owned by requests + cached == total, counted in pages, with no page counted
        twice; every running request's row keeps the page layout."""
        self.tree.check_integrity()  # first: it checks that nodes hold whole pages
        ps = self.page_size
        owned = []
        for r in running:
            row = self.req_to_token_pool.req_to_token[r.req_pool_idx, : r.kv_len].cpu()
            assert r.prefix_len % ps == 0, f"request {r.rid} shares a partial page with the cache"
            check_page_layout(row, ps)
            owned.append(pages_of(row[r.prefix_len :], ps))
        held = torch.cat(owned + [self.tree.all_slots()[::ps].cpu() // ps])
        assert held.numel() == held.unique().numel(), "a KV page is held twice"
        free = self.allocator.available_size() // ps
        assert free + held.numel() == self.allocator.num_pages, (
            f"KV pages leaked: free {free} + held {held.numel()} != total {self.allocator.num_pages}"
        )
        assert torch.equal(held.sort().values, self.allocator.used_pages()), "the allocator's free map disagrees"
