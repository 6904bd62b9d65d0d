"""Attention in plain torch (scaled_dot_product_attention), for CPU and as a reference.

Requests that bring one token (decodes, and one-token prompts) are attended together: their KV
slots are gathered into a padded [B, Lmax] index matrix, built once per forward, and one SDPA
call per layer covers them all with a key-padding mask. Requests that bring several tokens
(prefill chunks) are attended one by one with a causal mask offset by their cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from sglang.srt.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass
class _ExtendSegment:
    token_start: int
    extend_len: int
    kv_slots: torch.Tensor  # [seq_len] slots of the whole sequence, prefix included
    mask: Optional[torch.Tensor]  # [extend_len, seq_len] bool; None means plain causal (no prefix)


@dataclass
class TorchNativeMetadata:
    # Single-token requests; rows is None when they are the whole batch in order.
    single_rows: Optional[torch.Tensor]  # [Bs] token rows
    single_kv_slots: Optional[torch.Tensor]  # [Bs, Lmax] slots, padding points at slot 0
    single_mask: Optional[torch.Tensor]  # [Bs, 1, 1, Lmax] bool, True where a key is real
    extends: list[_ExtendSegment]


class TorchNativeAttnBackend(AttentionBackend):
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        device = req_to_token.device
        rows = forward_batch.req_pool_indices.tolist()
        single_reqs, single_rows, extends = [], [], []
        token_start = 0
        for i, (extend_len, seq_len) in enumerate(zip(forward_batch.extend_lens, forward_batch.seq_lens_cpu)):
            if extend_len == 1:
                single_reqs.append(i)
                single_rows.append(token_start)
            elif extend_len > 1:
                kv_len = seq_len - extend_len
                mask = None
                if kv_len > 0:
                    # query j sits at position kv_len + j and sees keys 0 .. kv_len + j
                    q_pos = torch.arange(kv_len, seq_len, device=device).unsqueeze(1)
                    mask = torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos
                slots = req_to_token[rows[i], :seq_len]
                extends.append(_ExtendSegment(token_start, extend_len, slots, mask))
            token_start += extend_len

        meta = TorchNativeMetadata(None, None, None, extends)
        if single_reqs:
            seq_lens = forward_batch.seq_lens[single_reqs] if extends else forward_batch.seq_lens
            max_len = int(seq_lens.max())
            pool_rows = forward_batch.req_pool_indices[single_reqs] if extends else forward_batch.req_pool_indices
            valid = torch.arange(max_len, device=device).unsqueeze(0) < seq_lens.unsqueeze(1)
            meta.single_kv_slots = req_to_token[pool_rows, :max_len].masked_fill(~valid, 0)
            meta.single_mask = valid[:, None, None, :]
            if extends:
                meta.single_rows = torch.tensor(single_rows, dtype=torch.int64, device=device)
        forward_batch.attn_metadata = meta

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
        meta: TorchNativeMetadata = forward_batch.attn_metadata
        out = torch.empty_like(q) if meta.extends else None

        if meta.single_kv_slots is not None:
            single = self._attend_single(q, meta, k_cache, v_cache, layer)
            if out is None:
                return single.reshape(q.shape[0], -1)
            out[meta.single_rows] = single

        for seg in meta.extends:
            rows = slice(seg.token_start, seg.token_start + seg.extend_len)
            out[rows] = self._attend_extend(q[rows], seg, k_cache, v_cache, layer)
        return out.view(q.shape[0], -1)

    @staticmethod
    def _attend_single(q, meta, k_cache, v_cache, layer) -> torch.Tensor:
        if meta.single_rows is not None:
            q = q[meta.single_rows]
        # q: [Bs, H, 1, D]; k, v: [Bs, Hkv, Lmax, D]
        k = k_cache[meta.single_kv_slots].to(q.dtype).transpose(1, 2)
        v = v_cache[meta.single_kv_slots].to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=meta.single_mask, scale=layer.scaling, enable_gqa=True
        )
        return o.squeeze(2)  # [Bs, H, D]

    @staticmethod
    def _attend_extend(q, seg: _ExtendSegment, k_cache, v_cache, layer) -> torch.Tensor:
        # q: [1, H, E, D]; k, v: [1, Hkv, S, D]
        k = k_cache[seg.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        v = v_cache[seg.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k,
            v,
            attn_mask=seg.mask,
            is_causal=seg.mask is None,
            scale=layer.scaling,
            enable_gqa=True,
        )
        return o.squeeze(0).transpose(0, 1)  # [E, H, D]
