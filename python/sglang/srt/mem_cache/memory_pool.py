"""KV memory of one rank: the request-to-token table, the paged slot allocator, the KV pool.

A request owns one row of `ReqToTokenPool.req_to_token`; entry `[row, i]` is the KV slot that
holds token `i` of the request. Slots name a row of every layer's K and V buffers in
`MHATokenToKVPool`.

Pages (`--page-size`, default 1): the allocator hands out whole pages of `page_size` slots; slot
`s` lives in page `s // page_size` at offset `s % page_size`. Each layer's K and V buffer has
`(num_pages + 1) * page_size` rows [rows, num_kv_heads, head_dim] (NHD), so
`k_buffer[layer].view(num_pages + 1, page_size, H, D)` is FlashInfer's paged layout. Page 0 is
never handed out: slot 0 is the padding slot that batched attention gathers from for positions
past a sequence's end (with pages the whole page 0 is reserved). Capacity is
`num_pages * page_size` tokens.

A request fills its last page before it takes a new one, so token `i` sits at offset
`i % page_size` of the page holding token `i - i % page_size`, and the request's page table is
`req_to_token[row, 0:seq_len:page_size] // page_size`. With page size 1 a page is a slot.

Pages move between three states: free (in the allocator), owned by a running request, or held
by the radix cache (which shares whole pages only). `KVCacheManager.check_integrity` checks
`free + owned + cached == total`, in pages.
"""

from __future__ import annotations

from typing import Optional, TypeVar

import torch

_Len = TypeVar("_Len", int, torch.Tensor)


def slots_needed(kv_len: _Len, seq_len: _Len, page_size: int) -> _Len:
    """Slots (whole new pages) that growing a request from `kv_len` to `seq_len` tokens takes
    from the pool: the free rest of its last page comes first. Works on ints and int tensors."""
    return (_num_pages(seq_len, page_size) - _num_pages(kv_len, page_size)) * page_size


def _num_pages(num_tokens: _Len, page_size: int) -> _Len:
    return -(-num_tokens // page_size)  # ceil, for ints and tensors alike


def pages_of(slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages holding `slots`, once each, for slots that list a page's slots together (a
    request's row, a tree node's value)."""
    return slots if page_size == 1 else torch.unique_consecutive(slots // page_size)


def check_page_layout(slots: torch.Tensor, page_size: int) -> None:
    """Assert that `slots[i]` (token i of a request, or of a page-aligned run) sits at offset
    `i % page_size` of the page that holds `slots[i - i % page_size]`."""
    if page_size == 1 or slots.numel() == 0:
        return
    i = torch.arange(slots.numel(), device=slots.device)
    assert bool((slots % page_size == i % page_size).all()), "a token is at the wrong offset of its page"
    assert bool((slots // page_size == slots[i - i % page_size] // page_size).all()), "a page is split"


class ReqToTokenPool:
    """Rows of token -> KV-slot indices, one row per running request.

    Row `padding_row` (one past the `size` rows handed out) is never allocated and stays all
    zeros (the padding slot 0, in page 0): the rows that pad a decode batch to a CUDA graph's
    batch size point at it, so they read and write nothing but the padding slot.
    """

    def __init__(self, size: int, max_context_len: int, device: str = "cpu"):
        self.size = size
        self.max_context_len = max_context_len
        self.padding_row = size
        # int64 so rows index the KV buffers directly, with no conversion on the hot path.
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int64, device=device)
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


class TokenToKVPoolAllocator:
    """Hands out KV pages 1..num_pages as the slots they hold; each page is freed exactly once.

    Sizes are in tokens (slots): `size == num_pages * page_size`. Freed pages are reused first.
    """

    def __init__(self, size: int, page_size: int = 1):
        assert page_size >= 1 and size % page_size == 0, f"{size} slots are not whole pages of {page_size}"
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self.clear()

    def clear(self) -> None:
        self._free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64)
        self._num_free = self.num_pages
        # A bitmap catches double frees in debug checks without scanning the free list.
        self._is_free = torch.ones(self.num_pages + 1, dtype=torch.bool)
        self._is_free[0] = False

    def available_size(self) -> int:
        """Free slots (whole free pages)."""
        return self._num_free * self.page_size

    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        """The slots of `num_tokens / page_size` new pages (int64, page by page), or None when
        fewer are free; `num_tokens` must be whole pages."""
        assert num_tokens % self.page_size == 0, f"{num_tokens} tokens are not whole pages of {self.page_size}"
        pages = self._take(num_tokens // self.page_size)
        if pages is None:
            return None
        return (pages.unsqueeze(1) * self.page_size + torch.arange(self.page_size)).flatten()

    def alloc_extend(
        self, kv_lens: torch.Tensor, seq_lens: torch.Tensor, last_slots: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Slots for tokens `kv_lens[i] .. seq_lens[i] - 1` of each request, concatenated in
        request order; None (nothing taken) when too few pages are free.

        A request first fills the rest of its last page, the one holding `last_slots[i]` (the
        slot of its token `kv_lens[i] - 1`; ignored when `kv_lens[i]` is a multiple of
        page_size), then takes new pages. All three are int64 tensors, [num_reqs].
        """
        ps = self.page_size
        first_new = _num_pages(kv_lens, ps)  # index (within the request) of its first new page
        num_new = _num_pages(seq_lens, ps) - first_new
        pages = self._take(int(num_new.sum()))
        if pages is None:
            return None
        extend_lens = seq_lens - kv_lens
        req = torch.repeat_interleave(torch.arange(len(extend_lens)), extend_lens)  # [T]
        token_start = torch.cumsum(extend_lens, 0) - extend_lens
        pos = torch.arange(len(req)) - token_start[req] + kv_lens[req]  # [T] position in its request
        page_in_req = pos // ps
        new_page = (torch.cumsum(num_new, 0) - num_new)[req] + page_in_req - first_new[req]
        # One lookup table for both kinds: each request's current last page, then the new ones.
        table = torch.cat([last_slots // ps, pages])
        page = table[torch.where(page_in_req >= first_new[req], len(extend_lens) + new_page, req)]
        return page * ps + pos % ps

    def _take(self, num_pages: int) -> Optional[torch.Tensor]:
        if num_pages > self._num_free:
            return None
        start = self._num_free - num_pages
        pages = self._free_pages[start : self._num_free].clone()
        self._num_free = start
        self._is_free[pages] = False
        return pages

    def free(self, slots: torch.Tensor) -> None:
        """Frees the pages holding `slots` (a request's or tree node's slots, page by page); the
        caller frees a page only when nothing else uses any of its slots."""
        if slots.numel() == 0:
            return
        pages = pages_of(slots.cpu(), self.page_size)  # rows of req_to_token may live on the GPU
        assert not bool(self._is_free[pages].any()), "KV page freed twice"
        assert pages.unique().numel() == pages.numel(), "KV page freed twice in one call"
        n = pages.numel()
        self._is_free[pages] = True
        self._free_pages[self._num_free : self._num_free + n] = pages
        self._num_free += n

    def used_pages(self) -> torch.Tensor:
        """Pages currently handed out, ascending (for integrity checks)."""
        return (~self._is_free[1:]).nonzero().flatten() + 1


class MHATokenToKVPool:
    """Per-layer K and V buffers indexed by slot.

    k_buffer[layer]: [(num_pages + 1) * page_size, num_kv_heads, head_dim] (NHD); viewed as
    [num_pages + 1, page_size, num_kv_heads, head_dim] it is FlashInfer's paged KV cache.
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        num_kv_heads: int,
        head_dim: int,
        layer_num: int,
        device: str = "cpu",
        page_size: int = 1,
    ):
        assert size % page_size == 0, f"{size} slots are not whole pages of {page_size}"
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_num = layer_num
        shape = (size + page_size, num_kv_heads, head_dim)  # page 0 is the reserved padding page
        # Uninitialized: a slot is always written before it is read, so only page 0 (slot 0 is
        # the padding slot, which masked attention still multiplies by zero) needs zeros. On CPU
        # this leaves the memory pages uncommitted until tokens land in them.
        self.k_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        for buf in self.k_buffer + self.v_buffer:
            buf[:page_size].zero_()

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, num_kv_heads: int, head_dim: int, layer_num: int) -> int:
        return 2 * num_kv_heads * head_dim * layer_num * dtype.itemsize

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [T, num_kv_heads, head_dim]
        self.k_buffer[layer_id][loc] = k.to(self.dtype)
        self.v_buffer[layer_id][loc] = v.to(self.dtype)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]
