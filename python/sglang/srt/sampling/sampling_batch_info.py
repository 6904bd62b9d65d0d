"""The tensors the sampler needs for one step, built from the sampling rows' parameters.

`SamplingBatchInfo.build` runs on every prefill and decode step, for the B rows that sample
(one per request). It loops over rows, never over the vocabulary, and builds the optional
parts (penalties, logit bias, banned tokens, top-k/top-p/min-p filtering) only when some row
uses them, so an all-greedy batch costs a few small tensors.

Randomness is keyed by each row's `(seed, step)`, not by its position in the batch: a
request samples the same tokens whichever requests share its batch and in whatever order.
"""

from __future__ import annotations

import array
import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.sampling.sampling_params import SamplingParams

_INT64_MOD = 1 << 64
_INT64_MAX = (1 << 63) - 1


@dataclass
class SparseLogitBias:
    """Values added to `logits[rows[i], token_ids[i]]`; banned tokens get -inf."""

    rows: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32


@dataclass
class PenaltyTensors:
    """Frequency, presence and repetition penalties, on the tokens each row has seen.

    Entries are flat indices `row * V + token_id` into the [B, V] logits, one per token
    occurrence (an index repeats when a token does), so the size follows the prompt and
    output lengths, never the vocabulary.
    """

    # Prompt and output tokens of the rows with a repetition penalty; None when none has one.
    seen_ids: Optional[torch.Tensor]  # [N] int64
    repetition_penalties: Optional[torch.Tensor]  # [N] float32, the entry's row's
    # Output tokens of the rows with a frequency or presence penalty; None when none has one.
    output_ids: Optional[torch.Tensor]  # [M] int64
    output_counts: Optional[torch.Tensor]  # [M] float32, occurrences of the entry's token
    frequency_penalties: Optional[torch.Tensor]  # [M] float32
    presence_penalties: Optional[torch.Tensor]  # [M] float32


@dataclass
class TokenBitmask:
    """Allowed next tokens of the rows with a grammar: bit j of `bitmask[i, w]` allows token
    32 * w + j in row `rows[i]` (xgrammar's layout)."""

    rows: torch.Tensor  # [G] int64, ascending and distinct
    bitmask: torch.Tensor  # [G, ceil(V / 32)] int32


@dataclass
class SamplingBatchInfo:
    batch_size: int
    vocab_size: int
    temperatures: torch.Tensor  # [B, 1] float32; 1.0 on greedy rows
    top_ps: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int64; -1 replaced by vocab_size
    min_ps: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, tokens the request already generated
    # Row lists hold ascending batch rows; None when empty.
    greedy_rows: Optional[torch.Tensor]  # [B - S] int64
    sample_rows: Optional[torch.Tensor]  # [S] int64, the others
    # The sample rows with top_k < vocab_size or top_p < 1, which sort candidates ...
    sorted_rows: Optional[torch.Tensor]  # [R] int64
    # ... and the others, which draw over the vocabulary in token-id order.
    unsorted_rows: Optional[torch.Tensor]  # [S - R] int64
    is_all_greedy: bool
    need_min_p: bool  # some non-greedy row has min_p > 0
    penalties: Optional[PenaltyTensors]
    logit_bias: Optional[SparseLogitBias]
    banned: Optional[SparseLogitBias]
    token_bitmask: Optional[TokenBitmask] = None  # None when no row has a grammar

    def __post_init__(self) -> None:
        assert self.temperatures.shape == (self.batch_size, 1)
        assert self.is_all_greedy == (self.sample_rows is None)
        num_sorted = 0 if self.sorted_rows is None else self.sorted_rows.shape[0]
        num_unsorted = 0 if self.unsorted_rows is None else self.unsorted_rows.shape[0]
        num_sampled = 0 if self.sample_rows is None else self.sample_rows.shape[0]
        num_greedy = 0 if self.greedy_rows is None else self.greedy_rows.shape[0]
        assert num_sorted + num_unsorted == num_sampled == self.batch_size - num_greedy

    @property
    def need_top_p_top_k(self) -> bool:
        """Whether some non-greedy row has top_k < vocab_size or top_p < 1."""
        return self.sorted_rows is not None

    @property
    def needs_logit_processing(self) -> bool:
        """Whether the raw logits must be changed before choosing tokens."""
        return (
            self.penalties is not None
            or self.logit_bias is not None
            or self.banned is not None
            or self.token_bitmask is not None
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        output_ids: list[list[int]],
        input_ids: list[list[int]],
        banned_token_ids: list[Optional[list[int]]],
        vocab_size: int,
        device: str | torch.device = "cpu",
        token_bitmask: Optional[tuple[list[int], torch.Tensor]] = None,
    ) -> SamplingBatchInfo:
        """`token_bitmask`: (rows, their CPU bitmask [G, ceil(V / 32)] int32) of the rows with
        a grammar, or None."""
        batch_size = len(params)
        assert batch_size > 0
        assert batch_size == len(seeds) == len(steps) == len(output_ids) == len(input_ids)
        assert batch_size == len(banned_token_ids)
        floats: list[tuple[float, float, float]] = []  # (temperature, top_p, min_p)
        ints: list[tuple[int, int, int]] = []  # (top_k, seed, step)
        greedy_rows: list[int] = []
        sample_rows: list[int] = []
        sorted_rows: list[int] = []
        unsorted_rows: list[int] = []
        need_min_p = False
        for row, p in enumerate(params):
            top_k = vocab_size if p.top_k < 0 else min(p.top_k, vocab_size)
            ints.append((top_k, _to_int64(seeds[row]), steps[row]))
            if p.is_greedy:
                floats.append((1.0, 1.0, 0.0))
                greedy_rows.append(row)
                continue
            floats.append((p.temperature, p.top_p, p.min_p))
            sample_rows.append(row)
            if top_k < vocab_size or p.top_p < 1.0:
                sorted_rows.append(row)
            else:
                unsorted_rows.append(row)
            need_min_p |= p.min_p > 0.0
        # One host-to-device copy per dtype instead of one per field.
        float_table = torch.tensor(floats, dtype=torch.float32, device=device)  # [B, 3]
        int_table = torch.tensor(ints, dtype=torch.int64, device=device)  # [B, 3]
        return cls(
            batch_size=batch_size,
            vocab_size=vocab_size,
            temperatures=float_table[:, 0:1],
            top_ps=float_table[:, 1],
            min_ps=float_table[:, 2],
            top_ks=int_table[:, 0],
            seeds=int_table[:, 1],
            steps=int_table[:, 2],
            greedy_rows=_optional_index_tensor(greedy_rows, device),
            sample_rows=_optional_index_tensor(sample_rows, device),
            sorted_rows=_optional_index_tensor(sorted_rows, device),
            unsorted_rows=_optional_index_tensor(unsorted_rows, device),
            is_all_greedy=not sample_rows,
            need_min_p=need_min_p,
            penalties=_build_penalties(params, output_ids, input_ids, vocab_size, device),
            logit_bias=_build_logit_bias(params, device),
            banned=_build_banned(banned_token_ids, device),
            token_bitmask=_build_token_bitmask(token_bitmask, device),
        )


def _to_int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits."""
    seed %= _INT64_MOD
    return seed - _INT64_MOD if seed > _INT64_MAX else seed


def _index_tensor(values: list[int], device: str | torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _optional_index_tensor(values: list[int], device: str | torch.device) -> Optional[torch.Tensor]:
    return _index_tensor(values, device) if values else None


def _flatten_rows(
    rows: list[int], token_lists: list[list[int]], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index of each token, token ids) for `token_lists[i]` belonging to `rows[i]`."""
    # array.array reads a list of ints several times faster than torch.tensor does, which
    # matters for prompts of thousands of tokens on every step. The tensor keeps the array.
    flat = array.array("q", list(itertools.chain.from_iterable(token_lists)))
    token_ids = torch.frombuffer(flat, dtype=torch.int64) if flat else _index_tensor([], "cpu")
    lengths = _index_tensor([len(tokens) for tokens in token_lists], device)
    # the total is known here: without it a device tensor's repeat waits on the device for it
    row_ids = torch.repeat_interleave(_index_tensor(rows, device), lengths, output_size=len(flat))
    return row_ids, token_ids.to(device)


def _build_penalties(
    params: list[SamplingParams],
    output_ids: list[list[int]],
    input_ids: list[list[int]],
    vocab_size: int,
    device: str | torch.device,
) -> Optional[PenaltyTensors]:
    repetition_rows = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    count_rows = [row for row, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if not repetition_rows and not count_rows:
        return None
    table = torch.tensor(
        [(p.frequency_penalty, p.presence_penalty, p.repetition_penalty) for p in params],
        dtype=torch.float32,
        device=device,
    )  # [B, 3]
    seen_ids = repetition_penalties = None
    if repetition_rows:
        rows, token_ids = _flatten_rows(
            repetition_rows * 2,
            [input_ids[row] for row in repetition_rows] + [output_ids[row] for row in repetition_rows],
            device,
        )
        seen_ids = rows * vocab_size + token_ids
        repetition_penalties = table[rows, 2]
    output_flat_ids = output_counts = frequency_penalties = presence_penalties = None
    if count_rows:
        rows, token_ids = _flatten_rows(count_rows, [output_ids[row] for row in count_rows], device)
        output_flat_ids = rows * vocab_size + token_ids
        output_counts = _occurrences(output_flat_ids)
        frequency_penalties = table[rows, 0]
        presence_penalties = table[rows, 1]
    return PenaltyTensors(
        seen_ids=seen_ids,
        repetition_penalties=repetition_penalties,
        output_ids=output_flat_ids,
        output_counts=output_counts,
        frequency_penalties=frequency_penalties,
        presence_penalties=presence_penalties,
    )


def _occurrences(ids: torch.Tensor) -> torch.Tensor:
    """[N] float32: how often each element of `ids` [N] occurs in it."""
    # Counting by sorting, not by a scatter: no float atomics, no [B, V] scratch tensor.
    ordered = ids.sort().values
    num_at_most = torch.searchsorted(ordered, ids, right=True)
    return (num_at_most - torch.searchsorted(ordered, ids)).float()


def _build_logit_bias(params: list[SamplingParams], device: str | torch.device) -> Optional[SparseLogitBias]:
    rows: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for key, value in (p.logit_bias or {}).items():
            rows.append(row)
            token_ids.append(int(key))
            values.append(value)
    if not rows:
        return None
    return SparseLogitBias(
        rows=_index_tensor(rows, device),
        token_ids=_index_tensor(token_ids, device),
        values=torch.tensor(values, dtype=torch.float32, device=device),
    )


def _build_banned(banned_token_ids: list[Optional[list[int]]], device: str | torch.device) -> Optional[SparseLogitBias]:
    rows = [row for row, banned in enumerate(banned_token_ids) if banned]
    if not rows:
        return None
    row_ids, token_ids = _flatten_rows(rows, [banned_token_ids[row] for row in rows], device)
    values = torch.full(token_ids.shape, float("-inf"), dtype=torch.float32, device=device)
    return SparseLogitBias(rows=row_ids, token_ids=token_ids, values=values)


def _build_token_bitmask(
    token_bitmask: Optional[tuple[list[int], torch.Tensor]], device: str | torch.device
) -> Optional[TokenBitmask]:
    if token_bitmask is None or not token_bitmask[0]:
        return None
    rows, bitmask = token_bitmask
    assert bitmask.dtype == torch.int32 and bitmask.shape[0] == len(rows)
    assert all(a < b for a, b in zip(rows, rows[1:])), "bitmask rows must be ascending and distinct"
    return TokenBitmask(rows=_index_tensor(rows, device), bitmask=bitmask.to(device, non_blocking=True))
