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
    """The links between a TKNP root and its ranks.

    Data (q/k/v, attention outputs, batches, logits) moves on `group`, in tensors on `device`;
    the step headers on `cpu_group` (gloo). Per attention layer the scatter/gather uses the
    collective that suits the backend: NCCL runs `all_to_all_single` with split sizes (one
    launch for every rank, every rank in it, empty partitions included); gloo runs
    point-to-point sends, which let the root overlap its own attention with the sends and skip
    empty partitions. Both modes run on gloo, so tests cover the NCCL path's logic on CPU.
    """

    group: Optional[dist.ProcessGroup]
    group_ranks: list[int]  # global ranks, index = tknp_rank; [0] is the root
    tknp_rank: int
    cpu_group: Optional[dist.ProcessGroup]
    device: torch.device
    use_all_to_all: bool

    @classmethod
    def of(cls, state: "ParallelState", device: str = "cpu", use_all_to_all: Optional[bool] = None) -> "TknpComm":
        """This process's TKNP group: the ranks that share its TP rank (TP rank r of the root
        sends q/k/v of its heads to TP rank r of every attention rank)."""
        ranks = next(g for g in state.layout.tknp_group_ranks() if state.global_rank in g)
        if use_all_to_all is None:
            use_all_to_all = state.backend == "nccl"
        return cls(
            state.tknp_group, ranks, state.coords.tknp, state.tknp_cpu_group, torch.device(device), use_all_to_all
        )

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
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(out, src=self.group_ranks[frm], group=self.group)
        return out

    def all_to_all_rows(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts), W] out, split by destination rank; [sum(recv_counts), W] back."""
        out = rows.new_empty((sum(recv_counts), rows.shape[1]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def all_gather_header(self, fields: list[int]) -> list[list[int]]:
        gathered = [torch.zeros(len(fields), dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(gathered, torch.tensor(fields, dtype=torch.int64), group=self.cpu_group)
        return [t.tolist() for t in gathered]


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
        super().__init__(inner.shape, inner.device)
        self.inner = inner
        self.comm = comm
        self.local_batch: Optional["ForwardBatch"] = None
        self.sizes: list[int] = []
        self.comm_seconds = 0.0  # time spent sending q/k/v and waiting for outputs (benchmarks)

    def begin(self, local_batch: Optional["ForwardBatch"], sizes: list[int]) -> None:
        """Sets the step's partition token counts and the root's own batch (None if empty),
        whose metadata for the inner backend the caller has built."""
        self.local_batch = local_batch
        self.sizes = sizes

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        pass  # the global batch needs none: each partition's metadata lives with its owner

    def forward(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch") -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D] for all partitions, rows in partition order
        start = time.perf_counter()
        q_parts, k_parts, v_parts = (x.split(self.sizes) for x in (q, k, v))
        width = layer.num_heads * layer.head_dim
        if self.comm.use_all_to_all:
            # the root keeps its own partition: it sends 0 rows to itself and receives none
            sends = [0] + self.sizes[1:]
            self.comm.all_to_all_rows(
                _pack_qkv(q[self.sizes[0] :], k[self.sizes[0] :], v[self.sizes[0] :]), sends, [0] * self.comm.size
            )
            local, local_seconds = self._local(q_parts, k_parts, v_parts, layer)
            empty = q.new_empty((0, width))
            outs = [self.comm.all_to_all_rows(empty, [0] * self.comm.size, sends)]
        else:
            pending = [
                self.comm.isend(_pack_qkv(q_parts[r], k_parts[r], v_parts[r]), r)
                for r in range(1, self.comm.size)
                if self.sizes[r]
            ]
            local, local_seconds = self._local(q_parts, k_parts, v_parts, layer)
            outs = [
                self.comm.recv((self.sizes[r], width), q.dtype, r) for r in range(1, self.comm.size) if self.sizes[r]
            ]
            for work in pending:
                work.wait()
        self.comm_seconds += time.perf_counter() - start - local_seconds
        return torch.cat([x for x in [local] + outs if x is not None])

    def _local(self, q_parts, k_parts, v_parts, layer: "RadixAttention") -> tuple[Optional[torch.Tensor], float]:
        """The root's own partition on the real backend (None if it has none), and its time."""
        if not self.sizes[0]:
            return None, 0.0
        start = time.perf_counter()
        out = self.inner.forward(q_parts[0], k_parts[0], v_parts[0], layer, self.local_batch)
        return out, time.perf_counter() - start


def serve_attention_layers(
    inner: AttentionBackend,
    layers: list["RadixAttention"],
    local_batch: Optional["ForwardBatch"],
    comm: TknpComm,
    dtype: torch.dtype,
) -> None:
    """Non-root side of one forward: attention of every layer for this rank's partition, whose
    metadata for `inner` the caller has built. With all_to_all a rank whose partition is empty
    (`local_batch` None) still joins every layer."""
    num_tokens = local_batch.input_ids.numel() if local_batch is not None else 0
    from_root = [num_tokens] + [0] * (comm.size - 1)
    nothing = [0] * comm.size
    for layer in layers:
        width = (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
        if comm.use_all_to_all:
            packed = comm.all_to_all_rows(torch.empty((0, width), dtype=dtype, device=comm.device), nothing, from_root)
        else:
            packed = comm.recv((num_tokens, width), dtype, 0)
        out = (
            inner.forward(*_unpack_qkv(packed, layer), layer, local_batch)
            if num_tokens
            else packed[:, : layer.num_heads * layer.head_dim]
        )
        if comm.use_all_to_all:
            comm.all_to_all_rows(out, from_root, nothing)
        else:
            comm.send(out, 0)
