"""The KV memory of one rank seen from the scheduler: rows, slots, and the prefix cache.

It owns the request-to-token table, the slot allocator, the KV pool and the radix cache, and
moves a request's slots between them: `start` gives a request its row and locks its cached prefix,
`alloc_extend` gives it slots for the tokens a step computes (evicting cached leaves when the
allocator runs short), and `release` hands everything back, the computed tokens to the cache.
"""

from __future__ import annotations

from typing import Optional

import torch

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache


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

    def available_size(self) -> int:
        """Slots a step can get: free ones plus cached ones nobody is using."""
        return self.allocator.available_size() + self.tree.evictable_size()

    def used_tokens(self) -> int:
        return self.total_tokens - self.available_size()

    def prefix_match_len(self, req: Req) -> int:
        """How many tokens of a waiting request the cache could serve now (for scheduling order)."""
        return len(self.tree.match_prefix(req.fill_ids[: req.max_prefix_len()]).indices)

    def start(self, req: Req) -> bool:
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

    def alloc_extend(self, reqs_and_lens: list[tuple[Req, int]]) -> Optional[torch.Tensor]:
        """Slots for `n` new tokens of each request, written into their rows; None if memory is short."""
        total = sum(n for _, n in reqs_and_lens)
        slots = self.alloc_tokens(total)
        if slots is None:
            return None
        offset = 0
        for req, n in reqs_and_lens:
            self.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slots[offset : offset + n])
            offset += n
        return slots

    def alloc_tokens(self, num_tokens: int) -> Optional[torch.Tensor]:
        if self.allocator.available_size() < num_tokens:
            self.tree.evict(num_tokens - self.allocator.available_size())
        return self.allocator.alloc(num_tokens)

    def cache_prompt(self, req: Req) -> None:
        """Shares a request's just-computed prompt through the prefix cache while it decodes,
        so requests arriving meanwhile with the same prefix reuse it."""
        n = len(req.origin_input_ids)
        if self.tree.disable or req.kv_len != n or req.prefix_len >= n:
            return
        row = req.req_pool_idx
        slots = self.req_to_token_pool.req_to_token[row, :n]
        inserted = self.tree.insert(req.origin_input_ids, slots)
        self.allocator.free(slots[req.prefix_len : max(inserted, req.prefix_len)])  # held by the tree already
        match = self.tree.match_prefix(req.origin_input_ids)
        self.req_to_token_pool.write(row, 0, match.indices)  # the tree's slots replace freed duplicates
        self.tree.inc_lock_ref(match.last_node)
        self.tree.dec_lock_ref(req.last_node)
        req.prefix_len, req.last_node = n, match.last_node

    def release(self, req: Req) -> None:
        """Returns a request's row; its computed tokens go to the prefix cache (or are freed)."""
        if req.req_pool_idx is None:
            return
        row = req.req_pool_idx
        slots = self.req_to_token_pool.req_to_token[row, : req.kv_len]
        inserted = self.tree.insert(req.fill_ids[: req.kv_len], slots)
        # The tree already held [prefix_len, inserted) from another request: ours are duplicates.
        self.allocator.free(slots[req.prefix_len : max(inserted, req.prefix_len)])
        if self.tree.disable:
            self.allocator.free(slots[req.prefix_len :])
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

    def check_integrity(self, running: list[Req]) -> None:
        """free + owned by requests + cached == total, with no slot counted twice."""
        owned = [
            self.req_to_token_pool.req_to_token[r.req_pool_idx, r.prefix_len : r.kv_len] for r in running
        ]
        held = torch.cat(owned + [self.tree.all_slots()]) if owned else self.tree.all_slots()
        assert held.numel() == held.unique().numel(), "a KV slot is held twice"
        free = self.allocator.available_size()
        assert free + held.numel() == self.total_tokens, (
            f"KV slots leaked: free {free} + held {held.numel()} != total {self.total_tokens}"
        )
        self.tree.check_integrity()
