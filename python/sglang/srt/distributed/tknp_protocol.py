"""The messages of one TKNP step, each with its pack/unpack pair.

A step of a TKNP group (model_executor/tknp_runner.py, layers/tknp_attention.py) is:

1. `StepHeader`, all-gathered by every rank: its partition's sizes, from which every rank knows
   every message's length (nothing else carries a length);
2. the batch, from each non-root rank with tokens to the root (`pack_batch` / `unpack_batch`):
   token ids, positions, lengths, sampled rows and logprob rows, all int64 in one tensor;
3. per attention layer, q/k/v of a partition from the root to its owner (`pack_qkv` /
   `unpack_qkv`), and the attention output [T, H * D] back, as is;
4. the logits, from the root to each rank that samples or scores prompt tokens (`pack_logits` /
   `unpack_logits`): float32 logits and logprobs in one tensor, top-logprob ids in a second.

Pack functions return the tensors to send; unpack functions take what was received (in the
shapes the header gives) and return what the other side packed.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import NamedTuple, Optional

import torch

from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass(frozen=True)
class StepHeader:
    """One rank's partition this step; all zeros for an empty one."""

    tokens: int = 0
    reqs: int = 0
    samples: int = 0  # rows whose logits choose a next token
    logprobs: int = 0  # prompt rows whose next-token logprob is scored
    top_k: int = 0  # top logprobs per scored row

    @classmethod
    def of(cls, batch: Optional[ForwardBatch]) -> "StepHeader":
        if batch is None:
            return cls()
        n_lp = 0 if batch.logprob_indices is None else batch.logprob_indices.numel()
        return cls(
            batch.input_ids.numel(), batch.batch_size, batch.sample_indices.numel(), n_lp, batch.input_top_logprobs_num
        )

    def pack(self) -> list[int]:
        return list(astuple(self))

    @classmethod
    def unpack(cls, fields: list[int]) -> "StepHeader":
        return cls(*fields)

    @property
    def is_plain_decode(self) -> bool:
        """One token and one sampled row per request, no prompt logprobs (graphs replay it)."""
        return self.tokens == self.reqs == self.samples and not self.logprobs

    def batch_len(self) -> int:
        """int64 elements of this partition's batch message."""
        return 2 * self.tokens + 2 * self.reqs + self.samples + 2 * self.logprobs

    def logits_len(self, vocab_size: int) -> int:
        """float32 elements of the logits message to this partition's rank (0: none is sent)."""
        return self.samples * vocab_size + self.logprobs * (1 + self.top_k)


def pack_batch(batch: ForwardBatch) -> torch.Tensor:
    """What the root needs of a partition to run the dense layers for it: no KV slots or pool
    rows, which mean something only on the owner rank."""
    parts = [
        batch.input_ids,
        batch.positions,
        torch.tensor(batch.extend_lens, dtype=torch.int64, device=batch.input_ids.device),
        batch.seq_lens,
        batch.sample_indices,
    ]
    if batch.logprob_indices is not None:
        parts += [batch.logprob_indices, batch.logprob_target_ids]
    return torch.cat(parts)


def unpack_batch(packed: torch.Tensor, header: StepHeader) -> ForwardBatch:
    h = header
    input_ids, positions, extend_lens, seq_lens, samples, lp_idx, lp_tgt = packed.split(
        [h.tokens, h.tokens, h.reqs, h.reqs, h.samples, h.logprobs, h.logprobs]
    )
    return ForwardBatch.without_kv(
        input_ids,
        positions,
        seq_lens,
        seq_lens.tolist(),
        extend_lens.tolist(),
        samples,
        logprob_indices=lp_idx if h.logprobs else None,
        logprob_target_ids=lp_tgt if h.logprobs else None,
        input_top_logprobs_num=h.top_k,
    )


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, (H + 2 Hkv) * D]: one message per partition and layer.
    Where q, k and v are the column blocks of one [T, W] tensor, as the fused qkv projection
    leaves them, that tensor is already the message: a view of it, no copy (a row range of it is
    then a partition's message)."""
    fused = _fused_qkv(q, k, v)
    return fused if fused is not None else torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    base = q._base
    if base is None or k._base is not base or v._base is not base:
        return None
    q_width, kv_width = q.shape[1] * q.shape[2], k.shape[1] * k.shape[2]
    width = q_width + 2 * kv_width
    if any(x.stride() != (width, x.shape[2], 1) for x in (q, k, v)):
        return None
    size = q.element_size()
    if k.data_ptr() != q.data_ptr() + q_width * size or v.data_ptr() != k.data_ptr() + kv_width * size:
        return None
    return q.as_strided((q.shape[0], width), (width, 1))


def unpack_qkv(
    packed: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a message's q [T, H, D], k and v [T, Hkv, D]."""
    packed = packed.contiguous()
    rows, width, offset = packed.shape[0], packed.shape[1], packed.storage_offset()
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    # as_strided: one op per view, where split and reshape take three (this runs per layer)
    return (
        packed.as_strided((rows, num_heads, head_dim), (width, head_dim, 1)),
        packed.as_strided((rows, num_kv_heads, head_dim), (width, head_dim, 1), offset + q_width),
        packed.as_strided((rows, num_kv_heads, head_dim), (width, head_dim, 1), offset + q_width + kv_width),
    )


def qkv_width(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    return (num_heads + 2 * num_kv_heads) * head_dim


class LogitsRows(NamedTuple):
    """A partition's share of the forward's output (LogitsProcessorOutput's fields)."""

    next_token_logits: torch.Tensor  # [S, V]
    input_token_logprobs: Optional[torch.Tensor] = None  # [R]
    input_top_logprobs: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # values, ids: [R, k]


def pack_logits(rows: LogitsRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """float32 logits then logprobs then top-logprob values in one tensor; the top ids (int64)
    in a second one, None without top logprobs."""
    floats = [rows.next_token_logits.flatten()]
    top_ids = None
    if rows.input_token_logprobs is not None:
        floats.append(rows.input_token_logprobs)
        if rows.input_top_logprobs is not None:
            values, top_ids = rows.input_top_logprobs
            floats.append(values.flatten())
    return torch.cat([f.float() for f in floats]), top_ids


def unpack_logits(
    floats: torch.Tensor, top_ids: Optional[torch.Tensor], header: StepHeader, vocab_size: int
) -> LogitsRows:
    h = header
    logits, lps, top_vals = floats.split([h.samples * vocab_size, h.logprobs, h.logprobs * h.top_k])
    logits = logits.view(h.samples, vocab_size)
    if not h.logprobs:
        return LogitsRows(logits)
    top = (top_vals.view(h.logprobs, h.top_k), top_ids) if h.top_k else None
    return LogitsRows(logits, lps, top)
