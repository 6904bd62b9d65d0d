"""Every message that crosses a process boundary, as dataclasses.

Flow: the tokenizer side sends `TokenizedGenerateReqInput`, `AbortReq`, `FlushCacheReq` and
`GetLoadReq` to a scheduler; the scheduler sends `BatchTokenIDOut` (new token ids, finish
reasons, logprobs) to the detokenizer, which turns them into `BatchStrOut` (text) for the
tokenizer side; replies to control requests go from the scheduler to the tokenizer side.

On the wire a message is JSON (`encode` / `decode`): dataclasses carry their class name, which
must be one of the classes registered here, so a peer can only ever construct these plain
dataclasses — nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

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
class FlushCacheReqOutput:
    success: bool


@dataclass
class GetLoadReq:
    pass


@dataclass
class GetLoadReqOutput:
    """A scheduler's state, for /get_server_info, /metrics and placement."""

    num_running_reqs: int
    num_waiting_reqs: int
    max_total_num_tokens: int
    kv_tokens_free: int  # free in the allocator
    kv_tokens_cached: int  # held by the prefix cache (evictable ones included)
    kv_tokens_used: int  # owned by requests or locked in the cache
    kv_tokens_pending: int  # still to be allocated: queued prompts, and what requests may generate
    num_received_reqs: int  # generate requests this scheduler has been sent, ever
    max_running_requests: int
    num_retractions: int
    cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    weight_bytes: int = 0  # parameters this rank holds (0 on a non-root TKNP rank)
    forward_seconds: float = 0.0  # wall time inside model forwards so far
    tknp_comm_seconds: float = 0.0  # of which the TKNP root spent on scatter/gather
    tknp_rank: int = 0
    # Under TKNP the controller's aggregate: one entry per rank, and requests placed per rank.
    ranks: list["GetLoadReqOutput"] = field(default_factory=list)
    placements: list[int] = field(default_factory=list)


@dataclass
class LoadReport:
    """A TKNP rank's state, pushed to the controller after steps, for placement decisions."""

    load: GetLoadReqOutput


@dataclass
class Tick:
    """Controller -> TKNP root: how many messages each rank has been sent so far (cumulative).
    The root broadcasts these counts each step, and every rank reads its socket up to its count,
    so all ranks act on the same messages in the same step."""

    counts: list[int]


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
    stop_strings: list[str] = field(default_factory=list)


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


_WIRE_TYPES = {
    cls.__name__: cls
    for cls in (
        TokenizedGenerateReqInput,
        AbortReq,
        FlushCacheReq,
        FlushCacheReqOutput,
        GetLoadReq,
        GetLoadReqOutput,
        LoadReport,
        Tick,
        ReqOutput,
        BatchTokenIDOut,
        ReqStrOutput,
        BatchStrOut,
        SamplingParams,
    )
}


def encode(msg: Any) -> bytes:
    return orjson.dumps(_to_wire(msg))


def decode(data: bytes) -> Any:
    return _from_wire(orjson.loads(data))


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        fields = {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__type__": type(obj).__name__, **fields}
    if isinstance(obj, set):
        return {"__set__": sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    return obj


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_wire(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__set__" in obj:
        return set(obj["__set__"])
    if "__type__" not in obj:
        return {k: _from_wire(v) for k, v in obj.items()}
    cls = _WIRE_TYPES.get(obj["__type__"])
    if cls is None:
        raise ValueError(f"unknown message type {obj['__type__']!r}")
    values = {k: _from_wire(v) for k, v in obj.items() if k != "__type__"}
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    msg = cls(**{k: v for k, v in values.items() if k in init})
    for k, v in values.items():
        if k not in init:
            setattr(msg, k, v)
    return msg
