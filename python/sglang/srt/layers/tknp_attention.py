"""TKNP attention: the one place where q/k/v go out to their owner ranks and outputs come back.

On the root, `TknpAttentionBackend` stands in for the attention backend of the global batch
(every rank's tokens, in rank order; `ForwardBatch.tknp_partitions` says how they split). Per
layer it cuts q, k, v into the partitions, sends each non-root partition to its owner, runs the
root's own partition on the real backend over the root's KV pool, and concatenates the outputs
in partition order. A non-root rank runs `serve_attention_layers`: for every attention layer, in
the same order, it receives its rows, writes k/v into its own KV pool and attends over its own
requests, and sends the output back. Models never know: they call RadixAttention, whose backend
is this wrapper. The transport and the messages' formats live in distributed/.

On shared memory with the `cpu` backend, a decode layer's steps run in one sgl_kernel call on
each side: on the root `tknp_root_decode_layer` runs a whole layer (qkv, the exchange with the
root's own attention in it, then the rest) where the layer runs on the kernels
(cpu_decode_layer.py), else `tknp_root_decode_attention` the exchange alone; on a rank
`tknp_rank_decode_layers` serves every layer of a forward. The same messages and ops in the same
order, without the Python between them, which had been most of the exchange's cost on the
root's critical path. `fused_exchange` gives both root ops their arguments.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.distributed.tknp_comm import TknpComm
from sglang.srt.distributed.tknp_protocol import pack_qkv, qkv_width, unpack_qkv
from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.layers.attention.cpu_backend import CpuAttnBackend

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch import ForwardBatch, TknpPartitions


class TknpAttentionBackend(AttentionBackend):
    """Root side: attention for the global batch, delegated partition by partition.

    Its metadata is the inner backend's for the root's own partition. Under CUDA graphs the
    graph runner builds that (capture and replay, as for any backend), so the root's graph body
    runs the model without calling `init_forward_metadata`."""

    def __init__(self, inner: AttentionBackend, comm: TknpComm, attention_threads: Optional[int] = None):
        assert comm.is_root
        super().__init__(inner.shape, inner.device)
        self.inner = inner
        self.comm = comm
        # A root that borrows its ranks' cores (cpu_binding.py) attends on its own ones only,
        # which are its first OpenMP threads' (None: on all of its threads).
        self.attention_threads = attention_threads
        self._seconds = [0.0, 0.0]  # the Python path's: comm_seconds, wait_seconds
        # the fused ops' (they add to it in place, without Python per layer): ns waiting, ns exchanging
        self._fused_ns = torch.zeros(2, dtype=torch.int64)
        self.fused = _fuses(inner, comm)
        self._no_kv = tuple(torch.empty(0, dtype=torch.int64) for _ in range(2))
        self._no_batch = tuple(torch.empty(0, dtype=torch.int64) for _ in range(4))
        self._exchange_parts: Optional[TknpPartitions] = None
        self._exchange: Optional[tuple] = None

    @property
    def comm_seconds(self) -> float:
        """Time spent sending q/k/v and waiting for outputs (benchmarks)."""
        return self._seconds[0] + 1e-9 * int(self._fused_ns[1])

    @property
    def wait_seconds(self) -> float:
        """Of which waiting for the ranks' outputs to start arriving (shared memory only)."""
        return self._seconds[1] + 1e-9 * int(self._fused_ns[0])

    def reset_timers(self) -> None:
        self._seconds = [0.0, 0.0]
        self._fused_ns.zero_()

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        local = forward_batch.tknp_partitions.local
        if local is not None:
            self.inner.init_forward_metadata(local)

    def forward(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch") -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D] for all partitions, rows in partition order. Per layer
        # and on the critical path: row ranges of one packed tensor (a view where q, k and v are
        # the fused projection's), not split and packed per partition (each torch op costs
        # microseconds here).
        exchange = self.fused_exchange(layer.layer_id, forward_batch)
        if exchange is not None:
            out = q.new_empty((q.shape[0], layer.num_heads * layer.head_dim))
            heads = [layer.num_heads, layer.num_kv_heads, layer.head_dim]
            self.inner.ops.tknp_root_decode_attention(out, pack_qkv(q, k, v), heads, layer.scaling, *exchange)
            return out
        start = time.perf_counter()
        parts = forward_batch.tknp_partitions
        sizes = parts.num_tokens
        own = sizes[0]
        width = layer.num_heads * layer.head_dim
        if self.comm.use_all_to_all:
            # the root keeps its own partition: it sends 0 rows to itself and receives none
            sends = [0] + sizes[1:]
            self.comm.all_to_all_rows(pack_qkv(q[own:], k[own:], v[own:]), sends, [0] * self.comm.size)
            local, local_seconds = self._local(q, k, v, own, layer, parts.local)
            empty = q.new_empty((0, width))
            outs = [self.comm.all_to_all_rows(empty, [0] * self.comm.size, sends)]
        else:
            packed = pack_qkv(q, k, v)
            pending, row = [], own
            for r in range(1, self.comm.size):
                if sizes[r]:
                    pending.append(self.comm.isend(packed[row : row + sizes[r]], r))
                    row += sizes[r]
            local, local_seconds = self._local(q, k, v, own, layer, parts.local)
            if parts.pass_turn is not None:  # the other micro-batch's dense layers, meanwhile
                turn_start = time.perf_counter()
                parts.pass_turn()
                local_seconds += time.perf_counter() - turn_start
            waited = self.comm.waited_seconds
            outs = [self.comm.recv((sizes[r], width), q.dtype, r) for r in range(1, self.comm.size) if sizes[r]]
            if waited is not None:
                self._seconds[1] += self.comm.waited_seconds - waited
            for work in pending:
                work.wait()
        self._seconds[0] += time.perf_counter() - start - local_seconds
        return torch.cat([x for x in [local] + outs if x is not None])

    def fused_exchange(self, layer_id: int, forward_batch: "ForwardBatch") -> Optional[tuple]:
        """The arguments of the fused root ops (`tknp_root_decode_attention`, and
        `tknp_root_decode_layer` for a whole layer) after the layer's heads: the root's own k/v
        caches of layer `layer_id`, its batch, the rows and the channels. None where this
        forward takes the Python path: not a decode on shared memory with the `cpu` backend, or
        a micro-batch of two-batch overlap."""
        parts = forward_batch.tknp_partitions
        if parts is not self._exchange_parts:  # once per forward; every layer reuses it
            self._exchange_parts, self._exchange = parts, self._exchange_of(parts)
        if self._exchange is None:
            return None
        kv = self._no_kv if parts.local is None else parts.local.token_to_kv_pool.get_kv_buffer(layer_id)
        return (*kv, *self._exchange)

    def _exchange_of(self, parts: TknpPartitions) -> Optional[tuple]:
        local = parts.local
        if not self.fused or parts.pass_turn is not None or (local is not None and not local.attn_metadata.decode):
            return None
        batch = self._no_batch
        if local is not None:
            batch = (local.out_cache_loc, local.req_to_token_pool.req_to_token, local.req_pool_indices, local.seq_lens)
        shm = self.comm.shm
        return (
            *batch, parts.num_tokens, self.attention_threads or 0, shm.segment, shm.send_channels,
            shm.recv_channels, shm.layout.slot_bytes, shm.layout.num_slots, shm.pids, shm.spin, self._fused_ns,
        )  # fmt: skip

    def _local(
        self, q, k, v, rows: int, layer: "RadixAttention", local: Optional["ForwardBatch"]
    ) -> tuple[Optional[torch.Tensor], float]:
        """The root's own partition, the first `rows` rows, on the real backend (None if it has
        none), and its time."""
        if local is None:
            return None, 0.0
        start = time.perf_counter()
        q, k, v = q[:rows], k[:rows], v[:rows]
        if self.attention_threads is None:
            out = self.inner.forward(q, k, v, layer, local)
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(self.attention_threads)
            try:
                out = self.inner.forward(q, k, v, layer, local)
            finally:
                torch.set_num_threads(threads)
        return out, time.perf_counter() - start


def serve_attention_layers(
    inner: AttentionBackend,
    layers: list["RadixAttention"],
    batches: list[Optional["ForwardBatch"]],
    comm: TknpComm,
    dtype: torch.dtype,
) -> None:
    """Non-root side of one forward: attention of every layer for this rank's partition, or
    under two-batch overlap for each of its two halves in turn, whose metadata for `inner` the
    caller has built. With all_to_all a rank whose partition is empty ([None]) still joins
    every layer."""
    batch = batches[0]
    if (
        len(batches) == 1
        and batch is not None
        and _fuses(inner, comm)
        and batch.attn_metadata.decode
        and _uniform(layers)
    ):
        _serve_decode_fused(inner, layers, batch, comm, dtype)
        return
    for layer in layers:
        for batch in batches:
            _serve_layer(inner, layer, batch, comm, dtype)


def _serve_layer(
    inner: AttentionBackend,
    layer: "RadixAttention",
    batch: Optional["ForwardBatch"],
    comm: TknpComm,
    dtype: torch.dtype,
) -> None:
    width = qkv_width(layer.num_heads, layer.num_kv_heads, layer.head_dim)
    if comm.use_all_to_all:
        num_tokens = batch.input_ids.numel() if batch is not None else 0
        from_root, nothing = [num_tokens] + [0] * (comm.size - 1), [0] * comm.size
        packed = comm.all_to_all_rows(torch.empty((0, width), dtype=dtype, device=comm.device), nothing, from_root)
        out = packed[:, : layer.num_heads * layer.head_dim]
        if num_tokens:
            out = inner.forward(*unpack_qkv(packed, layer.num_heads, layer.num_kv_heads, layer.head_dim), layer, batch)
        comm.all_to_all_rows(out, from_root, nothing)
    elif batch is not None:
        packed = comm.recv((batch.input_ids.numel(), width), dtype, 0)
        out = inner.forward(*unpack_qkv(packed, layer.num_heads, layer.num_kv_heads, layer.head_dim), layer, batch)
        comm.send(out, 0)


def _fuses(inner: AttentionBackend, comm: TknpComm) -> bool:
    """Whether a decode layer's exchange and attention can run as one sgl_kernel call: the
    `cpu` backend's kernels on the shared-memory transport, point to point."""
    return type(inner) is CpuAttnBackend and comm.shm is not None and not comm.use_all_to_all


def _uniform(layers: list["RadixAttention"]) -> bool:
    """Every layer has the same heads (one call serves them all)."""
    return len({(layer.num_heads, layer.num_kv_heads, layer.head_dim) for layer in layers}) == 1


def _serve_decode_fused(
    inner: CpuAttnBackend, layers: list["RadixAttention"], batch: "ForwardBatch", comm: TknpComm, dtype: torch.dtype
) -> None:
    """`serve_attention_layers` for one decode batch, every layer in one call."""
    shm, lay, pool = comm.shm, comm.shm.layout, batch.token_to_kv_pool
    caches = [pool.get_kv_buffer(layer.layer_id) for layer in layers]
    heads = [layers[0].num_heads, layers[0].num_kv_heads, layers[0].head_dim]
    shm.waited_seconds += 1e-9 * inner.ops.tknp_rank_decode_layers(
        [k for k, _ in caches], [v for _, v in caches], [layer.scaling for layer in layers], heads, dtype,
        batch.out_cache_loc, batch.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.seq_lens,
        shm.segment, shm.recv_channels[0], shm.send_channels[0], lay.slot_bytes, lay.num_slots, shm.pids[0], shm.spin,
    )  # fmt: skip
