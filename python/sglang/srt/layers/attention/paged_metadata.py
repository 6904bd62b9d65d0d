"""The page tables of a ForwardBatch in the CSR form paged-attention kernels (FlashInfer) take.

Page layout: KV slot `s` lives in page `s // page_size` at offset `s % page_size`, so a layer's
K buffer of `(num_pages + 1) * page_size` rows viewed as `[-1, page_size, Hkv, D]` is the NHD
paged cache. A request's tokens fill its pages in order, so its page table is the first slot of
each page, `req_to_token[row, 0:seq_len:page_size] // page_size`, and its last page holds
`seq_len - page_size * (num_pages - 1)` tokens. With page_size 1 a page is a slot.

Pure torch and free of any kernel library, so CPU tests check these arrays against a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass
class PagedKVMetadata:
    """Request b's query rows are `qo_indptr[b]:qo_indptr[b+1]` of the batch's tokens; its KV
    is the pages `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`, full but for the last one, which
    holds `kv_last_page_len[b]` tokens. Its queries sit at the end of its KV sequence."""

    # indptrs and last-page lengths stay on the CPU: they come from Python lists, and
    # FlashInfer's plan() reads them on the host anyway (no device sync to build or read them).
    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_last_page_len: torch.Tensor  # [B] int32, in 1..page_size
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32 page ids, on req_to_token's device
    page_size: int

    def __post_init__(self):
        batch_size = self.kv_last_page_len.numel()
        assert self.qo_indptr.numel() == self.kv_indptr.numel() == batch_size + 1
        assert self.kv_indices.numel() == int(self.kv_indptr[-1])
        for t in (self.qo_indptr, self.kv_indptr, self.kv_last_page_len, self.kv_indices):
            assert t.dtype == torch.int32, t.dtype

    @property
    def batch_size(self) -> int:
        return self.kv_last_page_len.numel()


def build_paged_kv_metadata(forward_batch: "ForwardBatch", page_size: int) -> PagedKVMetadata:
    """The page tables of the batch's requests, after this forward's tokens are written."""
    assert page_size >= 1
    seq_lens = torch.tensor(forward_batch.seq_lens_cpu, dtype=torch.int64)
    extend_lens = torch.tensor(forward_batch.extend_lens, dtype=torch.int64)
    assert bool((seq_lens >= 1).all()), "every request has at least one token in its KV cache"
    num_pages = (seq_lens + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    qo_indptr = _indptr(extend_lens)
    kv_last_page_len = seq_lens - page_size * (num_pages - 1)

    # The first slot of each page, gathered in one indexing op: (request row, column) pairs are
    # laid out on the CPU from the lengths, so nothing waits on the device.
    total_pages = int(kv_indptr[-1])
    req_of_page = torch.repeat_interleave(torch.arange(len(num_pages)), num_pages, output_size=total_pages)
    page_in_req = torch.arange(total_pages) - kv_indptr[:-1].to(torch.int64)[req_of_page]
    req_to_token = forward_batch.req_to_token_pool.req_to_token
    device = req_to_token.device
    rows = forward_batch.req_pool_indices.to(device)[req_of_page.to(device)]
    first_slots = req_to_token[rows, (page_in_req * page_size).to(device)]
    kv_indices = (first_slots // page_size).to(torch.int32)

    return PagedKVMetadata(
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        kv_last_page_len=kv_last_page_len.to(torch.int32),
        kv_indices=kv_indices,
        page_size=page_size,
    )


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(counts, 0)
    return out
