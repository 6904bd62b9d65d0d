"""Which waiting requests a step admits, and in what order.

Policies: `fcfs` (arrival order) and `lpm` (longest cached prefix first, so requests sharing a
prefix run while it is still cached; long queues fall back to fcfs since matching every waiting
request against the tree each step would cost more than it saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager
from sglang.srt.mem_cache.memory_pool import slots_needed
from sglang.srt.server_args import SCHEDULE_POLICIES

_LPM_MAX_QUEUE = 128


class SchedulePolicy:
    def __init__(self, policy: str, kv: KVCacheManager):
        if policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}, got '{policy}'")
        self.policy = policy
        self.kv = kv

    def order(self, waiting: list[Req]) -> list[Req]:
        if self.policy == "lpm" and len(waiting) <= _LPM_MAX_QUEUE:
            lens = {id(r): self.kv.prefix_match_len(r) for r in waiting}
            return sorted(waiting, key=lambda r: -lens[id(r)])
        return waiting


@dataclass
class PrefillBudget:
    """What the step being built may still add as prefill tokens."""

    tokens: int  # chunked_prefill_size minus the prefill tokens already scheduled
    reserved: int  # slots already promised: this step's new pages plus the decode reserve
    page_size: int = 1

    def take(self, kv_len: int, wanted: int, available: int) -> int:
        """How many of the `wanted` tokens after a request's first `kv_len` fit (0 when none),
        given the slots the KV cache can give now (free + evictable), and consume them. The free
        rest of the request's last page costs nothing; every new page costs page_size slots."""
        free_in_last_page = -kv_len % self.page_size
        new_pages = max(0, available - self.reserved) // self.page_size
        n = max(0, min(wanted, self.tokens, free_in_last_page + new_pages * self.page_size))
        self.tokens -= n
        self.reserved += slots_needed(kv_len, kv_len + n, self.page_size)
        return n
