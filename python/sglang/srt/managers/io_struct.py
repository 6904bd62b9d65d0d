"""Every message that crosses a process boundary, as dataclasses.

Flow: the tokenizer side sends `TokenizedGenerateReqInput`, `AbortReq` and `FlushCacheReq` to a
scheduler; the scheduler sends `BatchTokenIDOut` (new token ids, finish reasons, logprobs) to
the detokenizer, which turns them into `BatchStrOut` (text) for the tokenizer side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sglang.srt.sampling.sampling_params import SamplingParams

# [logprob, token_id] pairs travel as two parallel lists; top-k entries as (values, ids) per position.
TopLogprobs = Optional[tuple[list[float], list[int]]]


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class AbortReq:
    rid: str
    message: str = "aborted by request"


@dataclass
class FlushCacheReq:
    pass


@dataclass
class ReqOutput:
    """What one request gained since its last output (all lists are deltas)."""

    rid: str
    new_token_ids: list[int]
    finished_reason: Optional[dict]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    input_token_logprobs: list[tuple[Optional[float], int]] = field(default_factory=list)
    input_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False


@dataclass
class BatchTokenIDOut:
    outputs: list[ReqOutput]


@dataclass
class ReqStrOutput:
    """A ReqOutput with its text: `text_delta` extends what was sent before."""

    out: ReqOutput
    text_delta: str


@dataclass
class BatchStrOut:
    outputs: list[ReqStrOutput]
