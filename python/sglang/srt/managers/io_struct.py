"""Every message that crosses a process boundary, as dataclasses.

`GenerateReqInput` is a client's request as SGLang's native API shapes it (one prompt or a batch,
text or token ids); `check_shape` checks its JSON types before anything indexes into it.

Flow: the tokenizer side sends `TokenizedGenerateReqInput`, `AbortReq`, `FlushCacheReq` and
`GetLoadReq` to a scheduler; the scheduler sends `BatchTokenIDOut` (new token ids, finish
reasons, logprobs) to the detokenizer, which turns them into `BatchStrOut` (text) for the
tokenizer side; replies to control requests go from the scheduler to the tokenizer side.

On the wire a message is JSON (`encode` / `decode`): dataclasses carry their class name, which
must be one of the classes registered here, so a peer can only ever construct these plain
dataclasses — nothing is unpickled. The codec's markers are reserved keys ("__type__" for a
dataclass, "__set__" for a set); a plain dict that uses one of them, such as a client's
custom_params, travels wrapped as {"__dict__": {...}}, so user data is never read as a marker
and every dict comes back with exactly the keys it had.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import orjson

from sglang.srt.sampling.sampling_params import SamplingParams

# [logprob, token_id] pairs travel as two parallel lists; top-k entries as (values, ids) per position.
TopLogprobs = Optional[tuple[list[float], list[int]]]


# Top logprobs per position: OpenAI's chat limit. Each one costs a [logprob, id, text] entry per
# position in the response, so an unbounded count (up to the vocabulary) lets one request
# answer tens of MB.
MAX_TOP_LOGPROBS_NUM = 20


class RequestError(ValueError):
    """A request the engine rejects, and the field (`param`) at fault, for the HTTP error."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class GenerateReqInput:
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[dict, list[dict]]] = None
    rid: Optional[Union[str, list[str]]] = None
    return_logprob: bool = False
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    def __post_init__(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text and input_ids must be given")

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def prompts(self) -> list[Union[str, list[int]]]:
        if self.text is not None:
            return self.text if self.is_batch else [self.text]
        return self.input_ids if self.is_batch else [self.input_ids]


def check_shape(obj: GenerateReqInput) -> None:
    """The JSON types of a request's fields, checked before anything indexes into them."""
    if obj.text is not None and not _is_list_of(obj.text, str, allow_single=True):
        raise RequestError("text must be a string or a list of strings", "text")
    ids = obj.input_ids
    if ids is not None:
        if not isinstance(ids, list):
            raise RequestError("input_ids must be a list of token ids or a list of lists of them", "input_ids")
        if ids and isinstance(ids[0], list) and not all(isinstance(p, list) for p in ids):
            raise RequestError("input_ids: a batch must be a list of lists of token ids", "input_ids")
    if obj.rid is not None and not _is_list_of(obj.rid, str, allow_single=True):
        raise RequestError("rid must be a string or, for a batch, a list of strings", "rid")
    params = obj.sampling_params
    if params is not None and not _is_list_of(params, dict, allow_single=True):
        raise RequestError("sampling_params must be an object or, for a batch, a list of objects", "sampling_params")


def _is_list_of(value: Any, kind: type, allow_single: bool) -> bool:
    if allow_single and isinstance(value, kind):
        return True
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)


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
    # TKNP on shared memory: time the root's gather waited for the ranks' outputs to start
    # arriving (part of tknp_comm_seconds; the rest moves data), or a rank waited for its q/k/v
    tknp_wait_seconds: float = 0.0
    tknp_overlapped_steps: int = 0  # the TKNP root's steps run as two micro-batches (--enable-two-batch-overlap)
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
    # seconds from arrival at the scheduler to its first step / its first token (for /metrics)
    queue_seconds: Optional[float] = None
    first_token_seconds: Optional[float] = None
    tknp_rank: int = 0  # the rank that ran it (where it queued)


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


# The codec's reserved keys; a plain dict holding any of them is wrapped under _DICT.
_TYPE, _SET, _DICT = "__type__", "__set__", "__dict__"
_MARKERS = frozenset((_TYPE, _SET, _DICT))


def encode(msg: Any) -> bytes:
    return orjson.dumps(_to_wire(msg))


def decode(data: bytes) -> Any:
    return _from_wire(orjson.loads(data))


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        fields = {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {_TYPE: type(obj).__name__, **fields}
    if isinstance(obj, set):
        return {_SET: sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        fields = {k: _to_wire(v) for k, v in obj.items()}
        return {_DICT: fields} if not _MARKERS.isdisjoint(obj) else fields
    return obj


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_wire(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if _DICT in obj:
        return {k: _from_wire(v) for k, v in obj[_DICT].items()}
    if _SET in obj:
        return set(obj[_SET])
    if _TYPE not in obj:
        return {k: _from_wire(v) for k, v in obj.items()}
    cls = _WIRE_TYPES.get(obj[_TYPE])
    if cls is None:
        raise ValueError(f"unknown message type {obj[_TYPE]!r}")
    values = {k: _from_wire(v) for k, v in obj.items() if k != _TYPE}
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    msg = cls(**{k: v for k, v in values.items() if k in init})
    for k, v in values.items():
        if k not in init:
            setattr(msg, k, v)
    return msg
