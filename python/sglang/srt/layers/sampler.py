"""Chooses the next token of every sampling row from the model's logits.

Order of operations, per step:
  raw logits (float32) -> logprobs for the response (log_softmax of the raw logits)
  -> logit bias -> banned tokens (-inf) -> repetition, then frequency/presence penalties
  -> tokens a row's grammar does not allow (-inf)
  -> non-finite rows repaired (see `repair_non_finite`)
  -> greedy rows: argmax
  -> other rows: softmax(logits / temperature) -> keep top-k, top-p, min-p -> seeded draw.

The draw is inverse-CDF sampling with one uniform u per row: the token is the first whose
cumulative probability exceeds u times the kept mass. u is a hash of the row's (seed, step)
rather than a draw from a stateful generator, and every step works on one row at a time
(softmax, cumsum, sort), so a row's token depends only on its own logits, parameters, seed
and step: never on the other rows of the batch or their order.

Rows without top-k or top-p take the cumulative sum over the vocabulary in token-id order;
no sort. Rows with them sort only a candidate set: the most likely tokens, by probability
descending then token id, grown until it provably holds every token the filters keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.layers.cpu_kernels import sgl_kernel_ops
from sglang.srt.sampling.sampling_batch_info import (
    PenaltyTensors,
    SamplingBatchInfo,
    SparseLogitBias,
    TokenBitmask,
)


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


# SplitMix64's increment and finalizer multipliers.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
# Bits of a uniform: all that a float32 in [0, 1) holds exactly.
_UNIFORM_BITS = 24
# A top-k/top-p row first sorts this many candidates (or its top_k if larger); a row whose
# kept tokens may reach past them is retried with this factor more, up to the vocabulary.
_FIRST_CANDIDATES = 256
_CANDIDATE_GROWTH = 8


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    next_token_logprobs: Optional[torch.Tensor]  # [B] float32, when return_logprob
    # Per row: (logprobs descending, token ids) of its k = top_logprobs_nums[i] most likely
    # tokens, or None where k == 0.
    top_logprobs: Optional[list[Optional[tuple[list[float], list[int]]]]]


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,  # [B, V]
        info: SamplingBatchInfo,
        return_logprob: bool = False,
        top_logprobs_nums: Optional[list[int]] = None,
    ) -> SamplerOutput:
        assert logits.shape == (info.batch_size, info.vocab_size), (
            f"logits {tuple(logits.shape)} do not match the batch "
            f"({info.batch_size}, {info.vocab_size}); slice off vocabulary padding first"
        )
        logprobs = torch.log_softmax(logits.float(), dim=-1) if return_logprob else None
        processed = process_logits(logits, info)
        next_token_ids = torch.empty(info.batch_size, dtype=torch.int64, device=logits.device)
        for rows, choose in (
            (info.greedy_rows, _choose_greedy),
            (info.unsorted_rows, _sample_unsorted),
            (info.sorted_rows, _sample_sorted),
        ):
            if rows is not None:
                next_token_ids[rows] = choose(_take_rows(processed, rows), info, rows)
        if logprobs is None:
            return SamplerOutput(next_token_ids, None, None)
        chosen_logprobs = logprobs.gather(1, next_token_ids.unsqueeze(1)).squeeze(1)
        return SamplerOutput(next_token_ids, chosen_logprobs, _top_logprobs(logprobs, top_logprobs_nums))


def process_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """[B, V] float32 logits after bias, banned tokens and penalties; `logits` is not changed."""
    if not info.needs_logit_processing:
        return logits.float()
    x = logits.to(torch.float32, copy=True).contiguous()
    if info.logit_bias is not None:
        _add_sparse(x, info.logit_bias)
    if info.banned is not None:
        _add_sparse(x, info.banned)
    if info.penalties is not None:
        apply_penalties(x, info.penalties)
    if info.token_bitmask is not None:
        apply_token_bitmask(x, info.token_bitmask)
    repair_non_finite(x, logits)
    return x


def repair_non_finite(x: torch.Tensor, raw: torch.Tensor) -> None:
    """Makes every row of the processed logits `x` [B, V] one softmax can draw from, in place.

    Validated parameters keep the processed logits finite (banned tokens aside), but a row
    must never reach the draw with NaN or +inf, whose softmax is NaN everywhere: a row holding
    +inf keeps only its +inf tokens, equally likely (the limit of its softmax); NaN entries are
    dropped; a row left with nothing (all -inf) takes the argmax of its `raw` logits [B, V].
    """
    row_max = x.amax(dim=-1)  # NaN where a row holds NaN: amax propagates it
    bad = ~torch.isfinite(row_max)
    if not bool(bad.any()):  # the common case: one reduction, no copy
        return
    rows = bad.nonzero().squeeze(1)
    sub = x[rows]  # [R, V]
    inf = float("inf")
    pos_inf = sub == inf
    has_pos_inf = pos_inf.any(dim=-1, keepdim=True)
    # nan_to_num's defaults would turn -inf into the lowest float: keep infinities as they are
    dropped = sub.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)
    sub = torch.where(has_pos_inf, torch.where(pos_inf, 0.0, -inf), dropped)
    empty = (sub == -inf).all(dim=-1)
    if bool(empty.any()):
        fallback = raw[rows[empty]].float().nan_to_num(nan=-inf, posinf=inf, neginf=-inf).argmax(dim=-1, keepdim=True)
        forced = torch.full_like(sub[empty], -inf)
        sub[empty] = forced.scatter_(1, fallback, 0.0)
    x[rows] = sub


def apply_token_bitmask(x: torch.Tensor, mask: TokenBitmask) -> None:
    """Sets the logits of the tokens a row's grammar does not allow to -inf, in `x` [B, V] float32.

    When every row has a grammar (the usual batch of a JSON-schema workload) one `where` masks `x`
    in place; otherwise the rows with a grammar are gathered, masked and written back. At batch 32
    on a 49k vocabulary (2 Zen 4 cores) the in-place form takes about 1 ms a step, a gather,
    masked_fill and scatter of every row about 2 ms, and xgrammar's CPU kernel 4 ms."""
    vocab_size = x.shape[1]
    bits = torch.arange(32, dtype=torch.int32, device=mask.bitmask.device)
    # [G, W, 32] -> [G, 32 * W]: token 32 * w + j is bit j of word w (arithmetic >> is fine:
    # only the lowest bit is kept)
    allowed = ((mask.bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab_size].bool()  # [G, V]
    disallowed = torch.tensor(float("-inf"), dtype=x.dtype)  # a CPU scalar serves every device
    if mask.bitmask.shape[0] == x.shape[0]:  # rows are ascending and distinct: all of them, in order
        torch.where(allowed, x, disallowed, out=x)
    else:
        x.index_copy_(0, mask.rows, torch.where(allowed, x.index_select(0, mask.rows), disallowed))


def _add_sparse(x: torch.Tensor, bias: SparseLogitBias) -> None:
    x.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)


def apply_penalties(x: torch.Tensor, penalties: PenaltyTensors) -> None:
    """Penalizes the contiguous [B, V] logits `x` in place, on the seen tokens only.

    Repetition penalty as in HF transformers: a token seen in the prompt or output has a
    positive logit divided by the penalty and a negative one multiplied by it. Then
    OpenAI-style: frequency_penalty * count(output) + presence_penalty * (count > 0) is
    subtracted.
    """
    flat = x.view(-1)
    # Each update reads all its entries before writing any, so a repeated index gets the
    # same value from every one of its entries: a token is penalized once, not per occurrence.
    if penalties.seen_ids is not None:
        ids, rep = penalties.seen_ids, penalties.repetition_penalties
        seen = flat[ids]
        flat[ids] = torch.where(seen > 0, seen / rep, seen * rep)
    if penalties.output_ids is not None:
        ids = penalties.output_ids
        # Every output entry has count > 0, so each carries its row's presence penalty.
        flat[ids] = flat[ids] - penalties.frequency_penalties * penalties.output_counts - penalties.presence_penalties


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # Row lists are ascending and unique, so one as long as the batch is all of it: no copy.
    return x if rows.shape[0] == x.shape[0] else x[rows]


def _choose_greedy(logits: torch.Tensor, info: SamplingBatchInfo, rows: torch.Tensor) -> torch.Tensor:
    # torch's CPU argmax runs on one thread at about 8 GB/s: a millisecond a step at 32 rows
    # of 49K logits, against sgl_kernel's vectorized and threaded one (same ties and NaNs)
    ops = sgl_kernel_ops() if logits.device.type == "cpu" else None
    if ops is not None and logits.dtype == torch.float32 and logits.stride(-1) == 1:
        return ops.argmax(logits)
    return torch.argmax(logits, dim=-1)


def _sample_unsorted(logits: torch.Tensor, info: SamplingBatchInfo, rows: torch.Tensor) -> torch.Tensor:
    """Token ids [N] for rows without top-k/top-p, from their processed logits [N, V]."""
    probs = torch.softmax(logits / info.temperatures[rows], dim=-1)
    if info.need_min_p:
        # Rows with min_p == 0 keep every token: probabilities are never negative.
        threshold = info.min_ps[rows].unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    uniforms = seeded_uniforms(info.seeds[rows], info.steps[rows])
    return inverse_cdf(probs, probs.cumsum(dim=-1), None, uniforms)


def _sample_sorted(logits: torch.Tensor, info: SamplingBatchInfo, rows: torch.Tensor) -> torch.Tensor:
    """Token ids [R] for rows with top-k or top-p, from their processed logits [R, V]."""
    probs = torch.softmax(logits / info.temperatures[rows], dim=-1)
    vocab_size = probs.shape[1]
    filters = _RowFilters(info.top_ks[rows], info.top_ps[rows], info.min_ps[rows], vocab_size)
    uniforms = seeded_uniforms(info.seeds[rows], info.steps[rows])
    token_ids = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    num_candidates = _first_num_candidates(filters.top_ks, vocab_size)
    while True:
        chosen, resolved = _sample_candidates(
            _take_rows(probs, pending), num_candidates, filters.take(pending), uniforms[pending]
        )
        token_ids[pending[resolved]] = chosen[resolved]
        pending = pending[~resolved]
        if pending.shape[0] == 0:
            return token_ids
        num_candidates = min(vocab_size, num_candidates * _CANDIDATE_GROWTH)


def _first_num_candidates(top_ks: torch.Tensor, vocab_size: int) -> int:
    # One more than top_k shows whether the k-th token ties with the next; a row without
    # top-k (top-p only) needs a guess at its nucleus.
    has_top_k = top_ks < vocab_size
    num = int(top_ks[has_top_k].max()) + 1 if bool(has_top_k.any()) else 0
    if not bool(has_top_k.all()):
        num = max(num, _FIRST_CANDIDATES)
    return min(num, vocab_size)


@dataclass
class _RowFilters:
    top_ks: torch.Tensor  # [R] int64, vocab_size where off
    top_ps: torch.Tensor  # [R] float32
    min_ps: torch.Tensor  # [R] float32
    vocab_size: int

    def take(self, rows: torch.Tensor) -> _RowFilters:
        if rows.shape[0] == self.top_ks.shape[0]:
            return self
        return _RowFilters(self.top_ks[rows], self.top_ps[rows], self.min_ps[rows], self.vocab_size)


def _sample_candidates(
    probs: torch.Tensor, num_candidates: int, filters: _RowFilters, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [R], resolved [R] bool) drawn among each row's `num_candidates` most likely.

    The candidates' probabilities are the first `num_candidates` of the whole sorted row
    whatever the ties, so the filters' decisions over them are exact; only the identity of
    tokens tied with the least likely candidate is uncertain, as some of its ties may lie
    outside the set. A row is resolved when every token it keeps ranks above those: its
    draw is then the one the whole sorted row would give, so it depends on neither
    `num_candidates` nor the other rows that set it.
    """
    cand_probs, cand_ids = sorted_candidates(probs, num_candidates)  # [R, C] each
    cumulative = cand_probs.cumsum(dim=-1)
    num_kept = _num_kept(cand_probs, cumulative, filters)
    chosen = inverse_cdf(cand_probs, cumulative, num_kept, uniforms)
    token_ids = cand_ids.gather(1, chosen.unsqueeze(1)).squeeze(1)
    if num_candidates == filters.vocab_size:
        return token_ids, torch.ones_like(num_kept, dtype=torch.bool)
    num_above_least = (cand_probs > cand_probs[:, -1:]).sum(dim=-1)
    return token_ids, num_kept <= num_above_least


def sorted_candidates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, token ids), each [N, k]: the k most likely tokens per row, by probability
    descending then token id, the order a stable sort of the whole row gives."""
    if k == probs.shape[1]:
        return probs.sort(dim=-1, descending=True, stable=True)
    cand_probs, cand_ids = probs.topk(k, dim=-1, sorted=False)
    # topk leaves equal probabilities in no set order: order by token id, then stably by
    # probability.
    cand_ids, by_id = cand_ids.sort(dim=-1)
    cand_probs, order = cand_probs.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    return cand_probs, cand_ids.gather(1, order)


def _num_kept(cand_probs: torch.Tensor, cumulative: torch.Tensor, filters: _RowFilters) -> torch.Tensor:
    """[R] int64: how many of the sorted candidates [R, C] survive top-k, top-p and min-p.

    Top-p is over the top-k tokens renormalized (HF semantics); a token is kept while the
    mass ranked above it is at most top_p of that. Each filter keeps a prefix, so the
    survivors are one too. Zero-probability tokens are dropped: they can never be drawn.
    """
    num_candidates = cand_probs.shape[1]
    top_ks = filters.top_ks.unsqueeze(1)  # [R, 1]
    # Without top-k the mass is the whole vocabulary's, 1; no candidate set can sum it.
    top_k_mass = torch.where(
        top_ks < filters.vocab_size,
        cumulative.gather(1, top_ks.clamp(max=num_candidates) - 1),
        torch.ones_like(cumulative[:, :1]),
    )
    mass_above = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    ranks = torch.arange(num_candidates, device=cand_probs.device)
    keep = (
        (ranks < top_ks)
        & (mass_above <= filters.top_ps.unsqueeze(1) * top_k_mass)
        & (cand_probs >= filters.min_ps.unsqueeze(1) * cand_probs[:, :1])
        & (cand_probs > 0)
    )
    # The most likely token passes every filter; the clamp only guards against rounding.
    return keep.sum(dim=-1).clamp_(min=1)


def inverse_cdf(
    probs: torch.Tensor,
    cumulative: torch.Tensor,
    num_kept: Optional[torch.Tensor],
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Positions [N]: per row, the first whose cumulative probability exceeds u * total.

    `probs` [N, L] and its `cumulative` sum; only the first `num_kept[i]` positions count
    (all where None).
    """
    if num_kept is None:
        last = torch.full_like(uniforms, probs.shape[1] - 1, dtype=torch.int64).unsqueeze(1)
    else:
        last = (num_kept - 1).unsqueeze(1)  # [N, 1]
    target = uniforms.unsqueeze(1) * cumulative.gather(1, last)
    # seeded_uniforms' u <= 1 - 2**-24 keeps u * total below total in float32; should it
    # ever reach total, the clamp keeps the draw inside the kept positions.
    pos = torch.minimum(torch.searchsorted(cumulative, target, right=True), last)
    # The first position with the same cumulative sum is the token that raised it: after a
    # clamp onto trailing zero-probability tokens, the last one that has probability. (A
    # sequential cumsum, as on CPU, repeats the sum exactly over a zero.)
    pos = torch.searchsorted(cumulative, cumulative.gather(1, pos))
    # A NaN sum (logits that were not finite) sorts past the end: keep the index in range.
    pos = torch.minimum(pos, last)
    # A parallel scan (GPU) may round differently at two positions; never pick a token of
    # probability 0. The check waits for the device, as the caller's .tolist() would.
    valid = probs.gather(1, pos) > 0
    if not bool(valid.all()):
        pos = torch.where(valid, pos, probs.argmax(dim=-1, keepdim=True))
    return pos.squeeze(1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (a new tensor; wrapping multiplies)."""
    x = x ^ _logical_shift_right(x, 30)
    x = x * _MIX1
    x ^= _logical_shift_right(x, 27)
    x *= _MIX2
    x ^= _logical_shift_right(x, 31)
    return x


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[N] float32 in [0, 1): the `step`-th output of a SplitMix64 stream seeded by `seed`."""
    bits = mix64(mix64(seeds) + (steps + 1) * _GOLDEN)
    return _logical_shift_right(bits, 64 - _UNIFORM_BITS).float() * 2.0**-_UNIFORM_BITS


def _top_logprobs(
    logprobs: torch.Tensor, top_logprobs_nums: Optional[list[int]]
) -> Optional[list[Optional[tuple[list[float], list[int]]]]]:
    if not top_logprobs_nums or max(top_logprobs_nums) <= 0:
        return None
    assert len(top_logprobs_nums) == logprobs.shape[0]
    k_max = min(max(top_logprobs_nums), logprobs.shape[1])
    values, token_ids = logprobs.topk(k_max, dim=-1)
    values, token_ids = values.tolist(), token_ids.tolist()
    return [(values[row][:k], token_ids[row][:k]) if k > 0 else None for row, k in enumerate(top_logprobs_nums)]
