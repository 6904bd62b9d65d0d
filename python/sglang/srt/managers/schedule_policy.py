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
    """Token and memory budget left for prefill in the step being built."""

    tokens: int  # chunked_prefill_size minus what is already scheduled
    memory: int  # free + evictable slots minus what is already scheduled, minus the decode reserve

    def take(self, wanted: int) -> int:
        """How many of `wanted` tokens fit (0 when none), and consume them."""
        n = min(wanted, self.tokens, self.memory)
        n = max(n, 0)
        self.tokens -= n
        self.memory -= n
        return n
