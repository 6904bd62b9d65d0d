"""Which waiting requests a step admits, and in what order.

Policies: `fcfs` (arrival order) and `lpm` (longest cached prefix first, so requests sharing a
prefix run while it is still cached; long queues fall back to fcfs since matching every waiting
request against the tree each step would cost more than it saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager

SCHEDULE_POLICIES = ("fcfs", "lpm")
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
    reserved: int  # slots already promised: this step's tokens plus the decode reserve

    def room(self, available: int) -> int:
        """Prefill tokens that fit, given the slots the KV cache can give now (free + evictable)."""
        return max(0, min(self.tokens, available - self.reserved))

    def take(self, wanted: int, available: int) -> int:
        """How many of `wanted` tokens fit (0 when none), and consume them."""
        n = min(wanted, self.room(available))
        self.tokens -= n
        self.reserved += n
        return n
