"""TKNP attention: the one place where q/k/v go out to their owner ranks and outputs come back.

On the root, `TknpAttentionBackend` stands in for the attention backend of the global batch
(every rank's tokens, in rank order). Per layer it cuts q, k, v into the partitions, sends each
non-root partition to its owner, runs the root's own partition on the real backend over the
root's KV pool, and concatenates the outputs in partition order. A non-root rank runs
`serve_attention_layers`: for every attention layer, in the same order, it receives its rows,
writes k/v into its own KV pool and attends over its own requests, and sends the output back.
Models never know: they call RadixAttention, whose backend is this wrapper.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from sglang.srt.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from sglang.srt.distributed.parallel_state import ParallelState
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass
class TknpComm:
    """Point-to-point links between a TKNP root and its ranks (gloo: CPU tensors)."""

    group: Optional[dist.ProcessGroup]
    group_ranks: list[int]  # global ranks, index = tknp_rank; [0] is the root
    tknp_rank: int

    @classmethod
    def of(cls, state: "ParallelState") -> "TknpComm":
        """This process's TKNP group: the ranks that share its TP rank (TP rank r of the root
        sends q/k/v of its heads to TP rank r of every attention rank)."""
        ranks = next(g for g in state.layout.tknp_group_ranks() if state.global_rank in g)
        return cls(state.tknp_group, ranks, state.coords.tknp)

    @property
    def size(self) -> int:
        return len(self.group_ranks)

    @property
    def is_root(self) -> bool:
        return self.tknp_rank == 0

    def send(self, tensor: torch.Tensor, to: int) -> None:
        dist.send(tensor.contiguous(), dst=self.group_ranks[to], group=self.group)

    def isend(self, tensor: torch.Tensor, to: int) -> dist.Work:
        return dist.isend(tensor.contiguous(), dst=self.group_ranks[to], group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, frm: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        dist.recv(out, src=self.group_ranks[frm], group=self.group)
        return out


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [T, (H + 2 Hkv) * D]: one message per partition and layer
    return torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)


def _unpack_qkv(packed: torch.Tensor, layer: "RadixAttention") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_size = layer.num_heads * layer.head_dim
    kv_size = layer.num_kv_heads * layer.head_dim
    q, k, v = packed.split([q_size, kv_size, kv_size], dim=1)
    return (
        q.reshape(-1, layer.num_heads, layer.head_dim),
        k.reshape(-1, layer.num_kv_heads, layer.head_dim),
        v.reshape(-1, layer.num_kv_heads, layer.head_dim),
    )


class TknpAttentionBackend(AttentionBackend):
    """Root side: attention for the global batch, delegated partition by partition."""

    def __init__(self, inner: AttentionBackend, comm: TknpComm):
        assert comm.is_root
        self.inner = inner
        self.comm = comm
        self.local_batch: Optional["ForwardBatch"] = None
        self.sizes: list[int] = []
        self.comm_seconds = 0.0  # time spent sending q/k/v and waiting for outputs (benchmarks)

    def begin(self, local_batch: Optional["ForwardBatch"], sizes: list[int]) -> None:
        """Sets the step's partition token counts and the root's own batch (None if empty)."""
        self.local_batch = local_batch
        self.sizes = sizes
        if local_batch is not None:
            self.inner.init_forward_metadata(local_batch)

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        pass  # the global batch needs none: each partition's metadata lives with its owner

    def forward(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch") -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D] for all partitions, rows in partition order
        start = time.perf_counter()
        q_parts, k_parts, v_parts = (x.split(self.sizes) for x in (q, k, v))
        pending = [
            self.comm.isend(_pack_qkv(q_parts[r], k_parts[r], v_parts[r]), r)
            for r in range(1, self.comm.size)
            if self.sizes[r]
        ]
        outs = []
        local_seconds = 0.0
        if self.sizes[0]:
            local_start = time.perf_counter()
            outs.append(self.inner.forward(q_parts[0], k_parts[0], v_parts[0], layer, self.local_batch))
            local_seconds = time.perf_counter() - local_start
        width = layer.num_heads * layer.head_dim
        for r in range(1, self.comm.size):
            if self.sizes[r]:
                outs.append(self.comm.recv((self.sizes[r], width), q.dtype, r))
        for work in pending:
            work.wait()
        self.comm_seconds += time.perf_counter() - start - local_seconds
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def serve_attention_layers(
    inner: AttentionBackend,
    layers: list["RadixAttention"],
    local_batch: "ForwardBatch",
    comm: TknpComm,
    dtype: torch.dtype,
) -> None:
    """Non-root side of one forward: attention of every layer for this rank's partition."""
    inner.init_forward_metadata(local_batch)
    num_tokens = local_batch.input_ids.numel()
    for layer in layers:
        width = (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
        q, k, v = _unpack_qkv(comm.recv((num_tokens, width), dtype, 0), layer)
        comm.send(inner.forward(q, k, v, layer, local_batch), 0)
