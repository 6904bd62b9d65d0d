"""Attention with FlashInfer's paged kernels (CUDA only).

Per forward batch, `init_forward_metadata` builds the batch's page tables (paged_metadata) and
plans one wrapper over them: BatchDecodeWithPagedKVCacheWrapper when every request brings one
token, else BatchPrefillWithPagedKVCacheWrapper (prefill chunks, with or without a cached
prefix, and decodes mixed in: a decode is a one-row causal query at the end of its sequence).
Every layer then runs that plan. Each layer writes its new tokens' k/v into the KV pool first
and then attends over the pages, so a chunk's queries see its own keys through the same paged
cache as the prefix. The plan needs the heads, head size and dtypes, which the backend gets at
construction (AttentionShape), the same for every layer.

CUDA graphs: each captured batch size gets its own decode wrapper created with
use_cuda_graph=True over fixed page-table buffers (shared by all sizes, since one graph replays
at a time). The capture plans it for the static padding batch; before each replay
`init_forward_metadata_replay` plans it again for the real lengths, and plan() copies the page
tables into those buffers, which the captured kernels read.

Under TKNP a backend only ever sees its own rank's ForwardBatch, so it plans over its own
partition and its own KV pool. The registry imports this module only when the backend is chosen:
importing flashinfer here never happens on CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import flashinfer
import torch

from sglang.srt.layers.attention.base import AttentionBackend, AttentionShape
from sglang.srt.layers.attention.paged_metadata import PagedKVMetadata, build_paged_kv_metadata
from sglang.srt.model_executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_batch import ForwardBatch

# FlashInfer's recommended size for the split-KV scratch space the kernels share.
_WORKSPACE_BYTES = 128 * 1024 * 1024
_MAX_CUDA_CORE_GQA_GROUP = 4
# The KV dtypes this backend serves (FlashInfer has no float32 attention kernels).
_KV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class FlashInferMetadata:
    paged: PagedKVMetadata
    wrapper: Any  # planned over `paged`; every layer of the forward runs it


@dataclass
class _GraphBuffers:
    """Page tables the captured decode kernels read; plan() rewrites them before each replay."""

    kv_indptr: torch.Tensor  # [max_bs + 1] int32
    kv_indices: torch.Tensor  # [max_bs * pages of a max_context_len request] int32
    kv_last_page_len: torch.Tensor  # [max_bs] int32


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, shape: AttentionShape, device: "torch.device | str"):
        super().__init__(shape, device)
        if shape.kv_dtype not in _KV_DTYPES:
            raise ValueError(
                f"--attention-backend flashinfer needs a 16-bit KV cache (--dtype bfloat16 or float16), "
                f"got {shape.kv_dtype}; use --attention-backend torch_native for {shape.kv_dtype}"
            )
        # Above this many query heads per KV head, decode runs on tensor cores (the prefill
        # kernel), as SGLang chooses for 16-bit KV: the CUDA-core decode kernel covers small groups.
        self._use_tensor_cores = shape.num_heads // shape.num_kv_heads > _MAX_CUDA_CORE_GQA_GROUP
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, kv_layout="NHD", use_tensor_cores=self._use_tensor_cores
        )
        self._prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, kv_layout="NHD")
        self._graph_buffers: Optional[_GraphBuffers] = None
        self._graph_wrappers: dict[int, Any] = {}  # by captured batch size

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        paged = build_paged_kv_metadata(forward_batch, forward_batch.token_to_kv_pool.page_size)
        is_decode = forward_batch.forward_mode == ForwardMode.DECODE
        wrapper = self._decode_wrapper if is_decode else self._prefill_wrapper
        self._plan(wrapper, paged, is_decode)
        forward_batch.attn_metadata = FlashInferMetadata(paged, wrapper)

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int, kv_pool: "MHATokenToKVPool") -> None:
        max_pages_per_req = -(-max_context_len // kv_pool.page_size)
        self._graph_buffers = _GraphBuffers(
            kv_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            kv_indices=torch.zeros(max_bs * max_pages_per_req, dtype=torch.int32, device=self.device),
            kv_last_page_len=torch.ones(max_bs, dtype=torch.int32, device=self.device),
        )

    def init_forward_metadata_capture(self, forward_batch: "ForwardBatch") -> None:
        wrapper = self._graph_wrapper(forward_batch.batch_size)
        forward_batch.attn_metadata = FlashInferMetadata(self._plan_graph(wrapper, forward_batch), wrapper)

    def init_forward_metadata_replay(self, forward_batch: "ForwardBatch") -> None:
        self._plan_graph(self._graph_wrappers[forward_batch.batch_size], forward_batch)

    def _plan_graph(self, wrapper: Any, forward_batch: "ForwardBatch") -> PagedKVMetadata:
        assert forward_batch.forward_mode == ForwardMode.DECODE, "graphs run decode batches only"
        paged = build_paged_kv_metadata(forward_batch, forward_batch.token_to_kv_pool.page_size)
        self._plan(wrapper, paged, is_decode=True)
        return paged

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k, v)
        k_cache, v_cache = pool.get_kv_buffer(layer.layer_id)
        meta: FlashInferMetadata = forward_batch.attn_metadata
        page_size = meta.paged.page_size
        # [rows, Hkv, D] -> [pages, page_size, Hkv, D]: the NHD paged layout, no copy
        paged_kv = (
            k_cache.view(-1, page_size, layer.num_kv_heads, layer.head_dim),
            v_cache.view(-1, page_size, layer.num_kv_heads, layer.head_dim),
        )
        out = meta.wrapper.run(q.contiguous(), paged_kv)  # [T, H, D]
        return out.view(q.shape[0], -1)

    def _plan(self, wrapper: Any, paged: PagedKVMetadata, is_decode: bool) -> None:
        shape = self.shape
        # The first eight arguments are positional: their names changed across releases.
        common = dict(sm_scale=shape.scaling, q_data_type=shape.q_dtype, kv_data_type=shape.kv_dtype)
        tables = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len)
        dims = (shape.num_heads, shape.num_kv_heads, shape.head_dim, paged.page_size)
        if is_decode:
            wrapper.plan(*tables, *dims, **common)
        else:
            # causal here is FlashInfer's bottom-right alignment: the queries are the last rows
            # of each request's sequence, after its cached prefix.
            wrapper.plan(paged.qo_indptr, *tables, *dims, causal=True, **common)

    def _graph_wrapper(self, batch_size: int) -> Any:
        """The decode wrapper of graphs of `batch_size` requests, over the fixed buffers."""
        if batch_size not in self._graph_wrappers:
            buffers = self._graph_buffers
            assert buffers is not None, "init_cuda_graph_state comes before any graph"
            self._graph_wrappers[batch_size] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                kv_layout="NHD",
                use_cuda_graph=True,
                use_tensor_cores=self._use_tensor_cores,
                paged_kv_indptr_buffer=buffers.kv_indptr[: batch_size + 1],
                paged_kv_indices_buffer=buffers.kv_indices,
                paged_kv_last_page_len_buffer=buffers.kv_last_page_len[:batch_size],
            )
        return self._graph_wrappers[batch_size]
