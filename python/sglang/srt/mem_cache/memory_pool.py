"""KV memory of one rank: the request-to-token table, the token-slot allocator, the KV pool.

A request owns one row of `ReqToTokenPool.req_to_token`; entry `[row, i]` is the KV slot that
holds token `i` of the request. Slots are handed out by `TokenToKVPoolAllocator` and name a row
of every layer's K and V buffers in `MHATokenToKVPool`. Slot 0 is never handed out: it is the
padding slot that batched attention gathers from for positions past a sequence's end.

Slots move between three states: free (in the allocator), owned by a running request, or held by
the radix cache. `free + used + cached == total` is checked by `check_integrity` callers.
"""

from __future__ import annotations

from typing import Optional

import torch


class ReqToTokenPool:
    """Rows of token -> KV-slot indices, one row per running request."""

    def __init__(self, size: int, max_context_len: int, device: str = "cpu"):
        self.size = size
        self.max_context_len = max_context_len
        # int64 so rows index the KV buffers directly, with no conversion on the hot path.
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._free_rows: list[int] = list(range(size))

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> Optional[int]:
        """A free row, or None when every row is taken."""
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        assert 0 <= row < self.size and row not in self._free_rows, f"double free of row {row}"
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[row, start : start + len(slots)] = slots

    def clear(self) -> None:
        self._free_rows = list(range(self.size))


class TokenToKVPoolAllocator:
    """Hands out KV slots 1..size; each slot is freed exactly once."""

    def __init__(self, size: int):
        self.size = size
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64)
        self._num_free = self.size
        # A bitmap catches double frees in debug checks without scanning the free list.
        self._is_free = torch.ones(self.size + 1, dtype=torch.bool)
        self._is_free[0] = False

    def available_size(self) -> int:
        return self._num_free

    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        """`num_tokens` slot indices (int64), or None when fewer are free."""
        if num_tokens > self._num_free:
            return None
        start = self._num_free - num_tokens
        slots = self._free[start : self._num_free].clone()
        self._num_free = start
        self._is_free[slots] = False
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if n == 0:
            return
        assert not bool(self._is_free[slots].any()), "KV slot freed twice"
        self._is_free[slots] = True
        self._free[self._num_free : self._num_free + n] = slots
        self._num_free += n

    def used_slots(self) -> torch.Tensor:
        """Indices of the slots currently handed out (for integrity checks)."""
        return (~self._is_free[1:]).nonzero().flatten() + 1


class MHATokenToKVPool:
    """Per-layer K and V buffers indexed by slot.

    k_buffer[layer]: [size + 1, num_kv_heads, head_dim] (NHD, the layout FlashInfer accepts).
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        num_kv_heads: int,
        head_dim: int,
        layer_num: int,
        device: str = "cpu",
    ):
        self.size = size
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_num = layer_num
        shape = (size + 1, num_kv_heads, head_dim)
        # Uninitialized: a slot is always written before it is read, so only slot 0 (the
        # padding slot, which masked attention still multiplies by zero) needs zeros. On CPU
        # this leaves the pages uncommitted until tokens land in them.
        self.k_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        for buf in self.k_buffer + self.v_buffer:
            buf[0].zero_()

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, num_kv_heads: int, head_dim: int, layer_num: int) -> int:
        return 2 * num_kv_heads * head_dim * layer_num * dtype.itemsize

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [T, num_kv_heads, head_dim]
        self.k_buffer[layer_id][loc] = k.to(self.dtype)
        self.v_buffer[layer_id][loc] = v.to(self.dtype)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]
