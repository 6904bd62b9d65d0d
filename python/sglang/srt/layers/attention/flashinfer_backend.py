"""Attention with FlashInfer's paged kernels (CUDA only).

Per forward batch, `init_forward_metadata` builds the batch's page tables (paged_metadata) and
picks a wrapper: BatchDecodeWithPagedKVCacheWrapper when every request brings one token, else
BatchPrefillWithPagedKVCacheWrapper (prefill chunks, with or without a cached prefix, and decodes
mixed in: a decode is a one-row causal query at the end of its sequence). The wrapper is planned
once, at the batch's first attention layer, and every later layer reuses the plan. Each layer
writes its new tokens' k/v into the KV pool first and then attends over the pages, so a chunk's
queries see its own keys through the same paged cache as the prefix.

CUDA graphs: each captured batch size gets its own decode wrapper created with
use_cuda_graph=True over fixed page-table buffers (shared by all sizes, since one graph replays at
a time). The eager warmup before a capture plans it with the model's layer shape; before each
replay `init_forward_metadata_replay` plans it again for the real lengths, and plan() copies
the page tables into those buffers, which the captured kernels read.

Under TKNP a backend only ever sees its own rank's ForwardBatch, so it plans over its own
partition and its own KV pool. The registry imports this module only when the backend is chosen:
importing flashinfer here never happens on CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import flashinfer
import torch

from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.layers.attention.paged_metadata import PagedKVMetadata, build_paged_kv_metadata
from sglang.srt.model_executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_batch import ForwardBatch

# FlashInfer's recommended size for the split-KV scratch space the kernels share.
_WORKSPACE_BYTES = 128 * 1024 * 1024
# Above this many query heads per KV head, decode runs on tensor cores (the prefill kernel), as
# SGLang chooses for 16-bit KV: the CUDA-core decode kernel covers small groups only.
_MAX_CUDA_CORE_GQA_GROUP = 4
# The KV dtypes this backend serves (FlashInfer has no float32 attention kernels).
_KV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _LayerShape:
    """What a plan needs beyond the page tables; the same in every layer of a model."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype

    @property
    def use_tensor_cores(self) -> bool:
        return self.num_qo_heads // self.num_kv_heads > _MAX_CUDA_CORE_GQA_GROUP


@dataclass
class FlashInferMetadata:
    paged: PagedKVMetadata
    is_decode: bool
    # The captured batch size when this batch runs in (or is captured into) a CUDA graph.
    graph_bs: Optional[int] = None
    # The layer shape the wrapper was planned for; None until the first layer runs, because
    # it comes from the model's layers, not from the batch.
    planned_for: Optional[_LayerShape] = None


@dataclass
class _GraphBuffers:
    """Page tables the captured decode kernels read; plan() rewrites them before each replay."""

    kv_indptr: torch.Tensor  # [max_bs + 1] int32
    kv_indices: torch.Tensor  # [max_bs * pages of a max_context_len request] int32
    kv_last_page_len: torch.Tensor  # [max_bs] int32


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self) -> None:
        # Built on first use, on the KV pool's device: the backend is created before the pool.
        self._workspace: Optional[torch.Tensor] = None
        self._decode_wrapper: Any = None
        self._prefill_wrapper: Any = None
        self._graph_buffers: Optional[_GraphBuffers] = None
        self._graph_wrappers: dict[int, Any] = {}  # by captured batch size
        # The layer shape the graphs were captured with: replays plan before any layer runs.
        self._graph_shape: Optional[_LayerShape] = None

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        pool = forward_batch.token_to_kv_pool
        self._ensure_workspace(pool)
        forward_batch.attn_metadata = FlashInferMetadata(
            paged=build_paged_kv_metadata(forward_batch, pool.page_size),
            is_decode=forward_batch.forward_mode == ForwardMode.DECODE,
        )

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int, kv_pool: "MHATokenToKVPool") -> None:
        self._ensure_workspace(kv_pool)
        device = self._workspace.device
        max_pages_per_req = -(-max_context_len // kv_pool.page_size)
        self._graph_buffers = _GraphBuffers(
            kv_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=device),
            kv_indices=torch.zeros(max_bs * max_pages_per_req, dtype=torch.int32, device=device),
            kv_last_page_len=torch.ones(max_bs, dtype=torch.int32, device=device),
        )

    def init_forward_metadata_capture(self, forward_batch: "ForwardBatch") -> None:
        forward_batch.attn_metadata = self._graph_metadata(forward_batch)

    def init_forward_metadata_replay(self, forward_batch: "ForwardBatch") -> None:
        assert self._graph_shape is not None, "a graph is replayed before its capture planned it"
        wrapper = self._graph_wrappers[forward_batch.batch_size]
        self._plan_wrapper(wrapper, self._graph_metadata(forward_batch), self._graph_shape)

    def _graph_metadata(self, forward_batch: "ForwardBatch") -> FlashInferMetadata:
        assert forward_batch.forward_mode == ForwardMode.DECODE, "graphs run decode batches only"
        page_size = forward_batch.token_to_kv_pool.page_size
        return FlashInferMetadata(build_paged_kv_metadata(forward_batch, page_size), True, graph_bs=forward_batch.batch_size)

    def _ensure_workspace(self, pool: "MHATokenToKVPool") -> None:
        if self._workspace is not None:
            return
        k_cache = pool.get_kv_buffer(0)[0]
        if k_cache.dtype not in _KV_DTYPES:
            raise ValueError(
                f"--attention-backend flashinfer needs a 16-bit KV cache (--dtype bfloat16 or float16), "
                f"got {k_cache.dtype}; use --attention-backend torch_native for {k_cache.dtype}"
            )
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=k_cache.device)
        self._prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, kv_layout="NHD")

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
        wrapper = self._plan(meta, layer, q.dtype, k_cache.dtype)
        out = wrapper.run(q.contiguous(), paged_kv)  # [T, H, D]
        return out.view(q.shape[0], -1)

    def _plan(self, meta: FlashInferMetadata, layer: "RadixAttention", q_dtype: torch.dtype, kv_dtype: torch.dtype) -> Any:
        shape = _LayerShape(layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.scaling, q_dtype, kv_dtype)
        if meta.graph_bs is not None:
            self._graph_shape = shape
            wrapper = self._graph_wrapper(meta.graph_bs, shape)
        elif meta.is_decode:
            wrapper = self._decode(shape)
        else:
            wrapper = self._prefill_wrapper
        if meta.planned_for != shape:
            self._plan_wrapper(wrapper, meta, shape)
            meta.planned_for = shape
        return wrapper

    @staticmethod
    def _plan_wrapper(wrapper: Any, meta: FlashInferMetadata, shape: _LayerShape) -> None:
        paged = meta.paged
        # The first eight arguments are positional: their names changed across 0.2.x releases.
        common = dict(sm_scale=shape.sm_scale, q_data_type=shape.q_dtype, kv_data_type=shape.kv_dtype)
        tables = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len)
        dims = (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, paged.page_size)
        if meta.is_decode:
            wrapper.plan(*tables, *dims, **common)
        else:
            # causal here is FlashInfer's bottom-right alignment: the queries are the last rows
            # of each request's sequence, after its cached prefix.
            wrapper.plan(paged.qo_indptr, *tables, *dims, causal=True, **common)

    def _decode(self, shape: _LayerShape) -> Any:
        if self._decode_wrapper is None:
            self._decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, kv_layout="NHD", use_tensor_cores=shape.use_tensor_cores
            )
        return self._decode_wrapper

    def _graph_wrapper(self, batch_size: int, shape: _LayerShape) -> Any:
        """The decode wrapper of graphs of `batch_size` requests, over the fixed buffers."""
        if batch_size not in self._graph_wrappers:
            buffers = self._graph_buffers
            assert buffers is not None, "init_cuda_graph_state comes before any graph"
            self._graph_wrappers[batch_size] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                kv_layout="NHD",
                use_cuda_graph=True,
                use_tensor_cores=shape.use_tensor_cores,
                paged_kv_indptr_buffer=buffers.kv_indptr[: batch_size + 1],
                paged_kv_indices_buffer=buffers.kv_indices,
                paged_kv_last_page_len_buffer=buffers.kv_last_page_len[:batch_size],
            )
        return self._graph_wrappers[batch_size]

