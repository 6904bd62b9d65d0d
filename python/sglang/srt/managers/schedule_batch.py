"""Req: one request's life on its rank; ScheduleBatch: the requests of one forward step.

Lengths (one vocabulary everywhere):
  fill_ids      prompt + generated tokens: what the KV cache must end up holding
  prefix_len    tokens of fill_ids whose KV came from the radix cache (locked while running)
  kv_len        tokens of fill_ids whose KV is in the request's req_to_token row
  extend_len    tokens this step adds to kv_len (a prefill chunk, or 1 for a decode)
  seq_len       kv_len after this step
The last generated token has no KV until the next decode step feeds it back in.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from sglang.srt.constrained.grammar_backend import Grammar
from sglang.srt.mem_cache.radix_cache import TreeNode
from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams


@dataclass
class FinishReason:
    """Why a request ended, in the JSON shape SGLang reports under meta_info.finish_reason."""

    type: str  # "length" | "stop" | "abort"
    length: Optional[int] = None
    matched: Optional[int | str] = None
    message: Optional[str] = None

    def to_json(self) -> dict:
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        return {"type": "abort", "message": self.message}


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    stream: bool = False

    output_ids: list[int] = field(default_factory=list)
    finished_reason: Optional[FinishReason] = None
    # KV state, valid while the request holds a req_to_token row
    req_pool_idx: Optional[int] = None
    prefix_len: int = 0
    kv_len: int = 0
    last_node: Optional[TreeNode] = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache, reported to the user
    num_retractions: int = 0
    # constrained decoding: the compile in flight while the request is in the grammar queue,
    # then its matcher, which has accepted every output token (retraction keeps both)
    grammar_future: Optional[Future] = None
    grammar: Optional[Grammar] = None
    # logprobs gathered so far; input ones cover prompt positions logprob_start_len .. P-1
    input_token_logprobs: list[Optional[float]] = field(default_factory=list)
    input_top_logprobs: list[Optional[tuple[list[float], list[int]]]] = field(default_factory=list)
    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[Optional[tuple[list[float], list[int]]]] = field(default_factory=list)
    # how many output tokens / logprob entries have already been sent out (streaming deltas)
    num_sent_tokens: int = 0
    num_sent_input_logprobs: int = 0
    # latency, for /metrics: seconds from arrival at this scheduler to its first step, and to its
    # first sampled token (None until then); durations, so they mean the same in any process
    arrival_time: float = field(default_factory=time.perf_counter)
    queue_seconds: Optional[float] = None
    first_token_seconds: Optional[float] = None

    def __post_init__(self):
        assert self.origin_input_ids, "a request needs at least one input token"

    def mark_started(self) -> None:
        """The request joins a batch; only its first time counts as the end of its queueing."""
        if self.queue_seconds is None:
            self.queue_seconds = time.perf_counter() - self.arrival_time

    def mark_token(self) -> None:
        """A token was appended to output_ids."""
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.arrival_time

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def fill_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end], without building fill_ids (a decode step reads one token)."""
        prompt_len = len(self.origin_input_ids)
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.origin_input_ids[start:end] + self.output_ids[: max(end - prompt_len, 0)]

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and self.num_retractions == 0

    @property
    def first_scoring_position(self) -> int:
        """The first position whose logits score a token of the logprob window: the one just
        before the window, so that every window token is scored given all the tokens before it
        (only token 0, with no context, has no score)."""
        return max(self.logprob_start_len - 1, 0)

    def max_prefix_len(self) -> int:
        """Longest prefix that may come from the cache: the last token must always be computed
        (its logits pick the next token), and input logprobs need their window computed."""
        limit = self.fill_len - 1
        if self.wants_input_logprobs and not self.input_token_logprobs:
            limit = min(limit, self.first_scoring_position)
        return limit

    def is_finished(self) -> bool:
        return self.finished_reason is not None

    def remaining_new_tokens(self) -> int:
        return max(self.sampling_params.max_new_tokens - len(self.output_ids), 0)


@dataclass
class ScheduledReq:
    """One request's part of a step: which tokens it computes and whether it samples after."""

    req: Req
    extend_len: int
    samples: bool  # False for a prefill chunk that does not reach the end of fill_ids


@dataclass
class ScheduleBatch:
    items: list[ScheduledReq]

    @property
    def reqs(self) -> list[Req]:
        return [it.req for it in self.items]

    def is_empty(self) -> bool:
        return not self.items

    def num_tokens(self) -> int:
        return sum(it.extend_len for it in self.items)

    def to_forward_batch(self, out_cache_loc: torch.Tensor) -> ForwardBatch:
        """Token-level tensors of the step; KV slots for the new tokens come from the caller."""
        input_ids: list[int] = []
        positions: list[int] = []
        kv_lens, extend_lens, seq_lens, sample_rows = [], [], [], []
        logprob_rows: list[int] = []
        logprob_targets: list[int] = []
        top_k = 0
        for item in self.items:
            req, start, n = item.req, item.req.kv_len, item.extend_len
            row0 = len(input_ids)
            input_ids += req.fill_slice(start, start + n)
            positions += range(start, start + n)
            kv_lens.append(start)
            extend_lens.append(n)
            seq_lens.append(start + n)
            if item.samples:
                sample_rows.append(row0 + n - 1)
            if req.wants_input_logprobs:
                # a row at position p scores prompt token p + 1; token 0 has no score
                prompt_len = len(req.origin_input_ids)
                first = max(req.first_scoring_position, start)
                last = min(start + n, prompt_len - 1)
                logprob_rows += range(row0 + first - start, row0 + last - start)
                logprob_targets += req.fill_slice(first + 1, last + 1)
                top_k = max(top_k, req.top_logprobs_num)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)
        return ForwardBatch(
            forward_mode=ForwardMode.of(extend_lens),
            input_ids=as_long(input_ids),
            positions=as_long(positions),
            out_cache_loc=out_cache_loc,
            req_pool_indices=as_long([it.req.req_pool_idx for it in self.items]),
            seq_lens=as_long(seq_lens),
            seq_lens_cpu=seq_lens,
            kv_lens=kv_lens,
            extend_lens=extend_lens,
            sample_indices=as_long(sample_rows),
            logprob_indices=as_long(logprob_rows) if logprob_rows else None,
            logprob_target_ids=as_long(logprob_targets) if logprob_rows else None,
            input_top_logprobs_num=top_k,
        )
