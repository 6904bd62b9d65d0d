"""The attention backend interface. Models call it through RadixAttention, never directly.

A backend builds its metadata once per ForwardBatch (`init_forward_metadata`), then each layer
calls `forward`, which writes the new tokens' k/v into the KV pool and attends over the cache.
Token parallelism wraps a backend (it scatters q/k/v to the owning rank and gathers outputs),
so a backend only ever sees the requests whose KV lives on its own rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
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
