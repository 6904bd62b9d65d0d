"""ForwardBatch: the tensors one model forward needs, built by the model runner from a batch.

Token rows are laid out request after request: request i contributes `extend_lens[i]` rows,
the tokens at positions `kv_lens[i] .. seq_lens[i] - 1` of its sequence. A decode step is
the case `extend_lens[i] == 1` for every request; prefill chunks and decodes may share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base import AttentionBackend
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # at least one request brings several new tokens (prefill or a chunk of one)
    DECODE = auto()  # every request brings exactly one token

    @staticmethod
    def of(extend_lens: list[int]) -> "ForwardMode":
        return ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 KV slot written by each token
    req_pool_indices: torch.Tensor  # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor  # [B] int64 tokens in the KV cache after this forward
    seq_lens_cpu: list[int]
    kv_lens: list[int]  # tokens already in the KV cache before this forward
    extend_lens: list[int]  # new tokens this forward, seq_len - kv_len
    # Rows whose logits choose each request's next token (one per request that samples).
    sample_indices: torch.Tensor  # [S] int64
    # Rows whose log-softmax scores the next prompt token (input logprobs), and those tokens.
    logprob_indices: Optional[torch.Tensor] = None  # [R] int64
    logprob_target_ids: Optional[torch.Tensor] = None  # [R] int64
    input_top_logprobs_num: int = 0
    return_all_logits: bool = False
    req_to_token_pool: Optional["ReqToTokenPool"] = None
    token_to_kv_pool: Optional["MHATokenToKVPool"] = None
    attn_backend: Optional["AttentionBackend"] = None
    # Backend-specific metadata, set by attn_backend.init_forward_metadata and reused by every layer.
    attn_metadata: object = field(default=None, repr=False)
    # A TKNP root's global batch only: how its rows split into the ranks' partitions.
    tknp_partitions: Optional["TknpPartitions"] = field(default=None, repr=False)

    def __post_init__(self):
        assert len(self.kv_lens) == len(self.extend_lens) == len(self.seq_lens_cpu)
        assert sum(self.extend_lens) == self.input_ids.numel() == self.positions.numel()

    @classmethod
    def without_kv(
        cls,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: list[int],
        extend_lens: list[int],
        sample_indices: torch.Tensor,
        **optional: object,
    ) -> "ForwardBatch":
        """A batch whose KV lives on other ranks (what a TKNP root runs the dense layers for):
        tokens, lengths and the rows to score, but no KV slots or pool rows."""
        nothing = torch.empty(0, dtype=torch.int64, device=input_ids.device)
        return cls(
            forward_mode=ForwardMode.of(extend_lens),
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=nothing,
            req_pool_indices=nothing,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens_cpu,
            kv_lens=[s - e for s, e in zip(seq_lens_cpu, extend_lens)],
            extend_lens=extend_lens,
            sample_indices=sample_indices,
            **optional,
        )

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    def decode_rows(self, start: int, stop: int) -> Optional["ForwardBatch"]:
        """Requests [start, stop) of a rank's decode batch that samples every row and scores no
        prompt tokens, on the same pools and backend (its metadata still to build); None when
        empty. Two-batch overlap attends a partition in two such halves."""
        assert self.forward_mode == ForwardMode.DECODE and self.logprob_indices is None
        if start == stop:
            return None
        rows = slice(start, stop)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=self.input_ids[rows],
            positions=self.positions[rows],
            out_cache_loc=self.out_cache_loc[rows],
            req_pool_indices=self.req_pool_indices[rows],
            seq_lens=self.seq_lens[rows],
            seq_lens_cpu=self.seq_lens_cpu[rows],
            kv_lens=self.kv_lens[rows],
            extend_lens=self.extend_lens[rows],
            sample_indices=self.sample_indices[rows] - start,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend,
        )

    _DEVICE_FIELDS = (
        "input_ids",
        "positions",
        "out_cache_loc",
        "req_pool_indices",
        "seq_lens",
        "sample_indices",
        "logprob_indices",
        "logprob_target_ids",
    )

    def to(self, device: torch.device | str) -> "ForwardBatch":
        """Moves the tensors to the model's device (the scheduler builds them on the CPU) in
        place; a no-op on CPU."""
        device = torch.device(device)
        for name in self._DEVICE_FIELDS:
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device, non_blocking=True))
        return self


@dataclass
class TknpPartitions:
    """How a TKNP root's global batch (every rank's partition, in rank order) splits."""

    num_tokens: list[int]  # rows of each rank's partition
    local: Optional[ForwardBatch]  # the root's own partition, on its pools (None when empty)
    # Under two-batch overlap (a micro-batch's partitions): hands the turn to the other
    # micro-batch once this one's q/k/v are out and its own rows attended.
    pass_turn: Optional[Callable[[], None]] = None
