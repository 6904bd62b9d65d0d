"""Attention on sgl_kernel's native CPU kernels: the default on CPU when sgl_kernel is built.

Per layer, `forward` stores the batch's new k/v into the paged KV pool (store_kv), then attends
reading K and V in place through req_to_token, with no gather copy: a decode batch with one
decode_attention call (all query heads of a KV head together, long contexts split across
threads and merged by log-sum-exp), any other batch (prefill chunks after a cached prefix, mixed
with decodes) with one causal extend_attention call. Metadata is built once per forward: only
the extend lengths and query starts, as int64 tensors the kernels read.

`torch_native` stays the reference: tests compare this backend against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.layers.attention.base import AttentionBackend, AttentionShape
from sglang.srt.layers.cpu_kernels import sgl_kernel_ops
from sglang.srt.model_executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch import ForwardBatch

_DTYPES = (torch.float32, torch.bfloat16)


def cpu_backend_unsupported(shape: AttentionShape, device: "torch.device | str") -> Optional[str]:
    """Why the kernels cannot run this attention shape here, or None when they can."""
    if torch.device(device).type != "cpu":
        return f"it runs on the CPU only (device {device})"
    if sgl_kernel_ops() is None:
        return "sgl_kernel is not built (run make)"
    head_dims = tuple(sgl_kernel_ops().attention_head_dims())
    if shape.head_dim not in head_dims:
        return f"head_dim {shape.head_dim} is not one of {head_dims}"
    if shape.q_dtype not in _DTYPES or shape.kv_dtype not in _DTYPES:
        return f"dtypes {shape.q_dtype}/{shape.kv_dtype} are not float32 or bfloat16"
    if shape.q_dtype == torch.bfloat16 and shape.kv_dtype == torch.float32:
        return "bfloat16 compute needs a bfloat16 KV cache"
    return None


@dataclass
class CpuAttnMetadata:
    decode: bool
    extend_lens: Optional[torch.Tensor] = None  # [B] int64, extend batches only
    q_start: Optional[torch.Tensor] = None  # [B] int64 first query row of each request


class CpuAttnBackend(AttentionBackend):
    def __init__(self, shape: AttentionShape, device: "torch.device | str"):
        super().__init__(shape, device)
        reason = cpu_backend_unsupported(shape, device)
        if reason is not None:
            raise ValueError(f"attention backend cpu cannot run here: {reason}")
        self.ops = sgl_kernel_ops()

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        if forward_batch.forward_mode == ForwardMode.DECODE:
            forward_batch.attn_metadata = CpuAttnMetadata(decode=True)
            return
        extend_lens = torch.tensor(forward_batch.extend_lens, dtype=torch.int64)
        q_start = torch.cumsum(extend_lens, 0) - extend_lens
        forward_batch.attn_metadata = CpuAttnMetadata(False, extend_lens, q_start)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        k_cache, v_cache = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self.ops.store_kv(k_cache, v_cache, forward_batch.out_cache_loc, k, v)
        out = q.new_empty(q.shape)  # [T, H, D]
        meta: CpuAttnMetadata = forward_batch.attn_metadata
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        if meta.decode:
            self.ops.decode_attention(
                out,
                q,
                k_cache,
                v_cache,
                req_to_token,
                forward_batch.req_pool_indices,
                forward_batch.seq_lens,
                layer.scaling,
            )
        else:
            self.ops.extend_attention(
                out,
                q,
                k_cache,
                v_cache,
                req_to_token,
                forward_batch.req_pool_indices,
                forward_batch.seq_lens,
                meta.extend_lens,
                meta.q_start,
                layer.scaling,
            )
        return out.view(q.shape[0], -1)
