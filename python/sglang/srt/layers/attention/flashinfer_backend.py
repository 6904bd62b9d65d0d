"""Attention with FlashInfer's paged kernels (CUDA only).

Per forward batch, `init_forward_metadata` builds the batch's page tables (paged_metadata) and
picks a wrapper: BatchDecodeWithPagedKVCacheWrapper when every request brings one token, else
BatchPrefillWithPagedKVCacheWrapper (prefill chunks, with or without a cached prefix, and decodes
mixed in: a decode is a one-row causal query at the end of its sequence). The wrapper is planned
once, at the batch's first attention layer, and every later layer reuses the plan. Each layer
writes its new tokens' k/v into the KV pool first and then attends over the pages, so a chunk's
queries see its own keys through the same paged cache as the prefix.

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
    from sglang.srt.model_executor.forward_batch import ForwardBatch

# FlashInfer's recommended size for the split-KV scratch space the kernels share.
_WORKSPACE_BYTES = 128 * 1024 * 1024
# Above this many query heads per KV head, decode runs on tensor cores (the prefill kernel), as
# SGLang chooses for 16-bit KV: the CUDA-core decode kernel covers small groups only.
_MAX_CUDA_CORE_GQA_GROUP = 4
# The KV dtypes this backend serves (FlashInfer has no float32 attention kernels).
_KV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class FlashInferMetadata:
    paged: PagedKVMetadata
    is_decode: bool
    # (query heads, softmax scale, query dtype) the wrapper was planned for; None until the
    # first layer runs, because those come from the model's layers, not from the batch.
    planned_for: Optional[tuple[int, float, torch.dtype]] = None


class FlashInferAttnBackend(AttentionBackend):
    def __init__(self) -> None:
        # Built on first use, on the KV pool's device: the backend is created before the pool.
        self._workspace: Optional[torch.Tensor] = None
        self._decode_wrapper: Any = None
        self._prefill_wrapper: Any = None

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        pool = forward_batch.token_to_kv_pool
        if self._workspace is None:
            k_cache = pool.get_kv_buffer(0)[0]
            if k_cache.dtype not in _KV_DTYPES:
                raise ValueError(
                    f"--attention-backend flashinfer needs a 16-bit KV cache (--dtype bfloat16 or float16), "
                    f"got {k_cache.dtype}; use --attention-backend torch_native for {k_cache.dtype}"
                )
            self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=k_cache.device)
            self._prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, kv_layout="NHD")
        forward_batch.attn_metadata = FlashInferMetadata(
            paged=build_paged_kv_metadata(forward_batch, pool.page_size),
            is_decode=forward_batch.forward_mode == ForwardMode.DECODE,
        )

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
        key = (layer.num_heads, layer.scaling, q_dtype)
        wrapper = self._decode(layer) if meta.is_decode else self._prefill_wrapper
        if meta.planned_for == key:
            return wrapper
        paged = meta.paged
        # The first eight arguments are positional: their names changed across 0.2.x releases.
        common = dict(sm_scale=layer.scaling, q_data_type=q_dtype, kv_data_type=kv_dtype)
        tables = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len)
        shape = (layer.num_heads, layer.num_kv_heads, layer.head_dim, paged.page_size)
        if meta.is_decode:
            wrapper.plan(*tables, *shape, **common)
        else:
            # causal here is FlashInfer's bottom-right alignment: the queries are the last rows
            # of each request's sequence, after its cached prefix.
            wrapper.plan(paged.qo_indptr, *tables, *shape, causal=True, **common)
        meta.planned_for = key
        return wrapper

    def _decode(self, layer: "RadixAttention") -> Any:
        if self._decode_wrapper is None:
            use_tensor_cores = layer.num_heads // layer.num_kv_heads > _MAX_CUDA_CORE_GQA_GROUP
            self._decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, kv_layout="NHD", use_tensor_cores=use_tensor_cores
            )
        return self._decode_wrapper

