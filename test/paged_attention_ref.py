"""FlashInfer's paged attention semantics in plain torch, and a stand-in `flashinfer` module on it.

`paged_attention` takes exactly the CSR arrays and NHD paged K/V views FlashInfer's batch
wrappers take, and computes what they are documented to compute: per request, its pages in
order cut to kv_len, GQA, and (when causal) queries aligned to the end of the KV sequence, so a
chunk after a cached prefix sees the whole prefix. `fake_flashinfer()` wraps it in the two
wrapper classes FlashInferAttnBackend uses, with their constructor/plan/run call shapes, so the
backend's wiring runs on CPU; what it cannot check is the real kernels.
"""

from __future__ import annotations

import types
from typing import Optional

import torch


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_pages: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_pages: torch.Tensor,
    qo_indptr: torch.Tensor,  # [B + 1]
    kv_indptr: torch.Tensor,  # [B + 1]
    kv_indices: torch.Tensor,  # [kv_indptr[-1]]
    kv_last_page_len: torch.Tensor,  # [B]
    sm_scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """[T, H, D] in float32."""
    page_size = k_pages.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_pages.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(kv_last_page_len.numel()):
        pages = kv_indices[kv_indptr[b] : kv_indptr[b + 1]].long().cpu()
        kv_len = page_size * (len(pages) - 1) + int(kv_last_page_len[b])
        k = k_pages[pages].flatten(0, 1)[:kv_len].float()  # [S, Hkv, D]
        v = v_pages[pages].flatten(0, 1)[:kv_len].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [S, H, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        qb = q[rows].float()  # [E, H, D]
        scores = torch.einsum("ehd,shd->hes", qb, k) * sm_scale
        if causal:
            qo_len = qb.shape[0]
            q_pos = torch.arange(kv_len - qo_len, kv_len).unsqueeze(1)
            scores = scores.masked_fill(torch.arange(kv_len).unsqueeze(0) > q_pos, float("-inf"))
        out[rows] = torch.einsum("hes,shd->ehd", scores.softmax(-1), v)
    return out


class _Wrapper:
    """What both wrappers share: one plan, reused by every run, until the next plan."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False):
        assert kv_layout == "NHD"
        assert float_workspace_buffer.dtype == torch.uint8
        self.num_plans = 0
        self.num_runs = 0
        self._plan: Optional[dict] = None

    def _set_plan(
        self,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        causal,
        sm_scale,
        q_data_type,
        kv_data_type,
    ) -> None:
        for t in (qo_indptr, kv_indptr, kv_indices, kv_last_page_len):
            assert t.dtype == torch.int32, t.dtype
        assert num_qo_heads % num_kv_heads == 0
        assert bool((kv_last_page_len >= 1).all() and (kv_last_page_len <= page_size).all())
        self._plan = dict(
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            kv_last_page_len=kv_last_page_len,
            causal=causal,
            sm_scale=sm_scale,
            shape=(num_qo_heads, num_kv_heads, head_dim, page_size),
            dtypes=(q_data_type, kv_data_type),
        )
        self.num_plans += 1

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        p = self._plan
        assert p is not None, "run() before plan()"
        k_pages, v_pages = paged_kv_cache
        num_qo_heads, num_kv_heads, head_dim, page_size = p["shape"]
        assert q.is_contiguous() and q.shape[1:] == (num_qo_heads, head_dim)
        assert k_pages.shape[1:] == (page_size, num_kv_heads, head_dim) == v_pages.shape[1:]
        assert (q.dtype, k_pages.dtype) == p["dtypes"]
        assert q.shape[0] == int(p["qo_indptr"][-1])
        self.num_runs += 1
        out = paged_attention(
            q,
            k_pages,
            v_pages,
            p["qo_indptr"],
            p["kv_indptr"],
            p["kv_indices"],
            p["kv_last_page_len"],
            p["sm_scale"],
            p["causal"],
        )
        return out.to(q.dtype)


class _Decode(_Wrapper):
    """With use_cuda_graph, as FlashInfer documents it: the batch size is fixed by the buffers,
    plan() copies the page tables into them, and run() reads them from there (as a captured
    kernel would), so a buffer too small or a stale table shows up here."""

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
        paged_kv_indices_buffer: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
    ):
        super().__init__(float_workspace_buffer, kv_layout, use_tensor_cores)
        self.graph_buffers = None
        if use_cuda_graph:
            self.graph_buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)
            assert paged_kv_indptr_buffer.numel() == paged_kv_last_page_len_buffer.numel() + 1

    def plan(
        self,
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        *,
        sm_scale: float,
        q_data_type: torch.dtype,
        kv_data_type: torch.dtype,
    ) -> None:
        if self.graph_buffers is not None:
            indptr_buf, indices_buf, last_buf = self.graph_buffers
            assert last_page_len.numel() == last_buf.numel(), "the batch size of a CUDA-graph wrapper is fixed"
            assert indices.numel() <= indices_buf.numel(), "page indices overflow the CUDA-graph buffer"
            indptr_buf.copy_(indptr)
            indices_buf[: indices.numel()].copy_(indices)
            last_buf.copy_(last_page_len)
            indptr, indices, last_page_len = indptr_buf, indices_buf, last_buf
        qo_indptr = torch.arange(last_page_len.numel() + 1, dtype=torch.int32)  # one query per request
        self._set_plan(
            qo_indptr,
            indptr,
            indices,
            last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            True,
            sm_scale,
            q_data_type,
            kv_data_type,
        )


class _Prefill(_Wrapper):
    def plan(
        self,
        qo_indptr,
        paged_kv_indptr,
        paged_kv_indices,
        paged_kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        page_size,
        *,
        causal: bool = False,
        sm_scale: float,
        q_data_type: torch.dtype,
        kv_data_type: torch.dtype,
    ) -> None:
        self._set_plan(
            qo_indptr,
            paged_kv_indptr,
            paged_kv_indices,
            paged_kv_last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            page_size,
            causal,
            sm_scale,
            q_data_type,
            kv_data_type,
        )


def fake_flashinfer() -> types.ModuleType:
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = _Decode
    module.BatchPrefillWithPagedKVCacheWrapper = _Prefill
    return module
