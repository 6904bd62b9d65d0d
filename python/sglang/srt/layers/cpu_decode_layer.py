"""A Llama-family decoder layer of a decode step in one sgl_kernel call (`decode_layer`).

At batch 1 a decode step's kernels take about two thirds of it; the rest was Python: some forty
module calls, views and op dispatches per layer. `decode_layer` runs the same ops in the same
order from C++ (so the same bits: tests compare it with the layer-by-layer path), with one
dispatch per layer.

It is the layer-by-layer path's fast form, never a second model: a layer takes it only where
that path would have run every one of these ops on the kernels (bf16 weights packed for
sgl_kernel.linear, the kernels' norms, rotary and activation, no q/k norm, no bias on a
row-parallel linear), and a forward only for a decode batch whose rows the packed linears take
and whose attention is the plain `cpu` backend or a TKNP root's. On a TKNP root whose exchange
runs on shared memory, `tknp_root_decode_layer` is the same call with the exchange in place of
the attention. Otherwise the attention runs between two calls, `decode_layer_qkv` and
`decode_layer_out`: on a TKNP root (its scatter/gather in Python) and under tensor parallelism,
where `decode_layer_out` is itself split around the two all-reduces: o_proj, all-reduce,
`decode_layer_mlp`, all-reduce, as the layer-by-layer path runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from sglang.srt.layers.attention.cpu_backend import CpuAttnBackend
from sglang.srt.layers.linear import Linear, MergedLinear, linear_kernel_max_rows
from sglang.srt.layers.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from sglang.srt.layers.tknp_attention import TknpAttentionBackend
from sglang.srt.model_executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch import ForwardBatch


class CpuDecodeLayer:
    """`layer`'s decode forward through sgl_kernel.decode_layer; see `of`."""

    def __init__(self, ops: Any, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        kernels = [lin._kernel for lin in linears]
        self.ops = ops
        self.attention = attn.attn  # RadixAttention: how a TKNP root's layer reaches its ranks
        self.layer_id = attn.attn.layer_id
        self.eps = layer.input_layernorm.variance_epsilon
        self.scale = attn.attn.scaling
        self.cos_sin = attn.rotary_emb._cos_sin_half
        self.weights = [
            layer.input_layernorm.weight,
            kernels[0].packed,
            kernels[1].packed,
            layer.post_attention_layernorm.weight,
            kernels[2].packed,
            kernels[3].packed,
        ]
        self.biases = [k.bias for k in kernels]
        self.sizes = [attn.num_heads, attn.num_kv_heads, attn.head_dim] + [k.out_features for k in kernels]
        self.o_proj = kernels[1]
        self.tp = attn.o_proj.tp if isinstance(attn.o_proj, RowParallelLinear) else None

    @classmethod
    def of(cls, ops: Any, layer: nn.Module) -> Optional["CpuDecodeLayer"]:
        """The fast form of `layer`, or None where its layer-by-layer path is not all kernels."""
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        # exact types: the plain ones, or tensor parallelism's, whose all-reduces this mirrors
        merged, plain = (attn.qkv_proj, mlp.gate_up_proj), (attn.o_proj, mlp.down_proj)
        row_parallel = [type(lin) is RowParallelLinear for lin in plain]
        if (
            attn.qk_norm
            or any(type(lin) not in (MergedLinear, ColumnParallelLinear) or lin._kernel is None for lin in merged)
            or any(type(lin) not in (Linear, RowParallelLinear) or lin._kernel is None for lin in plain)
            or row_parallel[0] != row_parallel[1]
            or any(lin.bias is not None for lin, row in zip(plain, row_parallel) if row)
            or any(norm._ops is None for norm in norms)
            or norms[0].variance_epsilon != norms[1].variance_epsilon
            or mlp.act_fn._ops is None
            or attn.rotary_emb._cos_sin_half is None
        ):
            return None
        return cls(ops, layer)

    def takes(self, hidden: torch.Tensor, forward_batch: "ForwardBatch") -> bool:
        return (
            forward_batch.forward_mode == ForwardMode.DECODE
            and type(forward_batch.attn_backend) in (CpuAttnBackend, TknpAttentionBackend)
            and hidden.dtype == torch.bfloat16
            and hidden.dim() == 2
            and hidden.shape[0] <= linear_kernel_max_rows()
            and hidden.is_contiguous()
        )

    def __call__(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        forward_batch: "ForwardBatch",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = residual is None
        if first:
            residual = torch.empty_like(hidden)
        backend = forward_batch.attn_backend
        if type(backend) is TknpAttentionBackend and self.tp is None:
            exchange = backend.fused_exchange(self.layer_id, forward_batch)
            if exchange is not None:
                out = self.ops.tknp_root_decode_layer(
                    hidden, residual, not first, self.weights, self.biases, self.sizes, self.eps, self.scale,
                    positions, *self.cos_sin, *exchange,
                )  # fmt: skip
                return out, residual
        if self.tp is not None or type(backend) is TknpAttentionBackend:
            return self._split(positions, hidden, residual, first, forward_batch), residual
        k_cache, v_cache = forward_batch.token_to_kv_pool.get_kv_buffer(self.layer_id)
        out = self.ops.decode_layer(
            hidden,
            residual,
            not first,
            self.weights,
            self.biases,
            self.sizes,
            self.eps,
            self.scale,
            positions,
            *self.cos_sin,
            k_cache,
            v_cache,
            forward_batch.out_cache_loc,
            forward_batch.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
        )
        return out, residual

    def _split(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        first: bool,
        forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """The layer in calls around the attention, which a TKNP root runs through its ranks
        (each stores its own requests' k/v), and around TP's all-reduces."""
        qkv = self.ops.decode_layer_qkv(
            hidden, residual, not first, self.weights, self.biases, self.sizes, self.eps, positions, *self.cos_sin
        )
        heads, kv_heads, head_dim = self.sizes[:3]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        attn = self.attention(q, k, v, forward_batch)
        if self.tp is None:
            return self.ops.decode_layer_out(attn, residual, self.weights, self.biases, self.sizes, self.eps)
        o = self.tp.all_reduce(self.o_proj(attn))
        return self.tp.all_reduce(
            self.ops.decode_layer_mlp(o, residual, self.weights, self.biases, self.sizes, self.eps)
        )
