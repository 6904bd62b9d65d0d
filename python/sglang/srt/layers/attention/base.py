"""The attention backend interface. Models call it through RadixAttention, never directly.

A backend is built for one model's attention shape (`AttentionShape`: heads as this rank holds
them, head size, scale, dtypes), the same in every layer. It builds its metadata once per
ForwardBatch (`init_forward_metadata`: indices, masks, kernel plans), then each layer calls
`forward`, which writes the new tokens' k/v into the KV pool and attends over the cache.
Token parallelism wraps a backend (it scatters q/k/v to the owning rank and gathers outputs),
so a backend only ever sees the requests whose KV lives on its own rank.

CUDA graphs (model_executor/cuda_graph_runner.py) need more: metadata the captured kernels read
from fixed buffers, rewritten before each replay. A backend that can do that sets
`supports_cuda_graph` and implements `init_cuda_graph_state`, `init_forward_metadata_capture`
and `init_forward_metadata_replay`; with any other backend the model runner runs every forward
eagerly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass(frozen=True)
class AttentionShape:
    """What every attention layer of a model shares, as one rank runs it."""

    num_heads: int  # query heads on this rank (its TP shard)
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_dtype: torch.dtype  # the compute dtype
    kv_dtype: torch.dtype  # the KV cache's dtype

    @classmethod
    def of(cls, layers: Sequence["RadixAttention"], q_dtype: torch.dtype, kv_dtype: torch.dtype) -> "AttentionShape":
        shapes = {(a.num_heads, a.num_kv_heads, a.head_dim, a.scaling) for a in layers}
        assert len(shapes) == 1, f"attention layers of one model differ in shape: {sorted(shapes)}"
        return cls(*shapes.pop(), q_dtype, kv_dtype)


class AttentionBackend(ABC):
    supports_cuda_graph = False

    def __init__(self, shape: AttentionShape, device: "torch.device | str"):
        self.shape = shape
        self.device = torch.device(device)  # the KV pool's, where the backend keeps its buffers

    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Precomputes whatever every layer of this forward shares (indices, masks, plans)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the batch's new tokens; returns [T, H * D]."""

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int, kv_pool: "MHATokenToKVPool") -> None:
        """Allocates the fixed metadata buffers of graphs for batches of up to `max_bs` requests
        of up to `max_context_len` tokens, on the KV pool's device."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_capture(self, forward_batch: "ForwardBatch") -> None:
        """Metadata for capturing the graph of a bucket-sized decode batch (its static buffers);
        the eager warmup runs before the capture plan the kernels, the captured run reuses it."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_replay(self, forward_batch: "ForwardBatch") -> None:
        """Before replaying the graph of `forward_batch.batch_size` (a padded decode batch whose
        tensors equal the static buffers): rewrites the fixed buffers for its real lengths."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")
