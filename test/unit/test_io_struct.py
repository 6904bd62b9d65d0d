"""The wire codec of io_struct: every message type survives encode -> decode, with nested
messages, None, floats, lists, sets and sampling parameters. The types are enumerated from the
module, so a new message is covered (and must be registered for the wire) without a new test.

JSON has no tuple: a tuple (a (logprob, token id) pair, top-k (values, ids)) comes back as a
list, which every consumer unpacks the same way; the comparison below treats them alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from typing import Any

import pytest
from sglang.srt.managers import io_struct
from sglang.srt.managers.io_struct import (
    BatchTokenIDOut,
    GetLoadReqOutput,
    ReqOutput,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from sglang.srt.sampling.sampling_params import SamplingParams

# GenerateReqInput aside: the client's request, parsed from HTTP JSON, never crosses processes
MESSAGE_TYPES = [
    cls
    for cls in vars(io_struct).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == io_struct.__name__
    if cls is not io_struct.GenerateReqInput
]
WIRE_TYPES = MESSAGE_TYPES + [SamplingParams]  # sampling params travel inside requests


class _Example:
    """Builds a value of a type hint; every leaf differs from the others, so a field that came
    back under another name, or a swapped pair, shows. `optional_none` picks None wherever None
    is allowed."""

    def __init__(self, optional_none: bool = False):
        self.optional_none = optional_none
        self.counter = itertools.count(1)

    def value(self, hint: Any, depth: int = 0) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Union:
            if type(None) in args and self.optional_none:
                return None
            return self.value(next(a for a in args if a is not type(None)), depth)
        if origin is list:
            # a message that nests its own type (GetLoadReqOutput.ranks) stops after one level
            return [] if depth > 1 else [self.value(args[0], depth + 1) for _ in range(2)]
        if origin is tuple:
            return tuple(self.value(a, depth + 1) for a in args if a is not Ellipsis)
        if origin is set:
            return {self.value(args[0], depth + 1) for _ in range(2)}
        if origin is dict or hint is dict:  # a bare dict: JSON-shaped values, like a finish reason
            value_hint = args[1] if args else Any
            return {f"k{next(self.counter)}": self.value(value_hint, depth + 1) for _ in range(2)}
        if hint is bool:
            return next(self.counter) % 2 == 0
        if hint is int:
            return next(self.counter) * 1000 + 7
        if hint is float:
            return next(self.counter) / 3  # not exact in binary: must come back bit for bit
        if hint is str:
            return f"text {next(self.counter)} é ✓ \n"
        if hint is Any or hint is object:
            return {"nested": [1, 2.5, None, "x"], "flag": True}
        if dataclasses.is_dataclass(hint):
            return self.message(hint, depth + 1)
        raise AssertionError(f"no example for {hint!r}: extend _Example")

    def message(self, cls: type, depth: int = 0) -> Any:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        msg = cls(**{f.name: self.value(hints[f.name], depth) for f in fields if f.init})
        for f in fields:
            if not f.init:  # set after construction (SamplingParams.stop_str_max_len): must travel too
                setattr(msg, f.name, self.value(hints[f.name], depth))
        return msg


def _plain(obj: Any) -> Any:
    """What a value means on the wire, with tuples as lists and message types kept."""
    if dataclasses.is_dataclass(obj):
        return (type(obj).__name__, {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, set):
        return ("set", sorted(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _round_trip(msg: Any) -> Any:
    data = encode(msg)
    assert isinstance(data, bytes)
    got = decode(data)
    assert type(got) is type(msg)
    assert _plain(got) == _plain(msg)
    assert encode(got) == data, "encoding is stable"
    return got


def test_every_message_type_is_found():
    names = {cls.__name__ for cls in MESSAGE_TYPES}
    assert {"TokenizedGenerateReqInput", "AbortReq", "BatchTokenIDOut", "BatchStrOut", "GetLoadReqOutput"} <= names


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("optional_none", [False, True], ids=["filled", "nones"])
def test_round_trip_of_every_message_type(cls, optional_none):
    msg = _Example(optional_none).message(cls)
    _round_trip(msg)


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda cls: cls.__name__)
def test_round_trip_with_defaults(cls):
    """Only the required fields given: default factories (empty lists) travel as they are."""
    example = _Example()
    hints = typing.get_type_hints(cls)
    required = {
        f.name: example.value(hints[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    _round_trip(cls(**required))


def test_a_request_keeps_its_normalized_sampling_params():
    params = SamplingParams.from_dict(
        {
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 12,
            "stop": "END",
            "stop_token_ids": [5, 3, 5],
            "logit_bias": {"17": -1.5},
            "sampling_seed": 2**40,
        }
    )
    params.normalize()
    params.stop_str_max_len = 2
    msg = TokenizedGenerateReqInput(
        rid="r-1", input_ids=[1, 2, 3], sampling_params=params, seed=-9, return_logprob=True, logprob_start_len=1
    )
    got = _round_trip(msg)
    assert got == msg  # no tuples inside: plain equality holds
    assert got.sampling_params.stop_token_ids == {3, 5}, "a set stays a set"
    assert got.sampling_params.stop == ["END"] and got.sampling_params.stop_str_max_len == 2


def test_token_outputs_keep_logprob_pairs_none_and_top_k():
    out = ReqOutput(
        rid="r",
        new_token_ids=[7, 8],
        finished_reason={"type": "stop", "matched": "</s>"},
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=1,
        input_token_logprobs=[(None, 4), (-0.125, 5), (-1e-30, 6)],
        input_top_logprobs=[None, ([-0.1, -2.5], [5, 9])],
        output_token_logprobs=[(-0.5, 7), (-3.75, 8)],
        output_top_logprobs=[([-0.5], [7]), None],
        stop_strings=["</s>", "\n\n"],
    )
    got = _round_trip(BatchTokenIDOut([out, dataclasses.replace(out, rid="s", finished_reason=None)])).outputs[0]
    lp, tid = got.input_token_logprobs[2]
    assert lp == -1e-30 and tid == 6
    assert got.input_token_logprobs[0][0] is None and got.output_top_logprobs[1] is None
    vals, ids = got.input_top_logprobs[1]
    assert vals == [-0.1, -2.5] and ids == [5, 9]


def test_a_load_report_nests_the_ranks_loads():
    example = _Example()
    rank = example.message(GetLoadReqOutput)
    total = dataclasses.replace(example.message(GetLoadReqOutput), ranks=[rank, rank], placements=[3, 4])
    got = _round_trip(io_struct.LoadReport(total))
    assert all(isinstance(r, GetLoadReqOutput) for r in got.load.ranks)
    assert got.load.ranks[0] == rank


def test_unknown_types_are_refused_and_plain_dicts_stay_dicts():
    with pytest.raises(ValueError, match="unknown message type 'Popen'"):
        decode(b'{"__type__": "Popen", "args": ["sh"]}')
    assert decode(encode({"a": [1, None, 2.5]})) == {"a": [1, None, 2.5]}


@pytest.mark.parametrize(
    "value",
    [
        {"__type__": "Nope"},
        {"__set__": 1},
        {"__dict__": {"__type__": "Popen"}},
        {"__type__": "AbortReq", "rid": "x", "nested": [{"__set__": [1, 2]}, {"plain": {"__dict__": 3}}]},
    ],
)
def test_user_dicts_with_the_codec_markers_round_trip_unchanged(value):
    """A client's custom_params once reached the codec's markers: {"__type__": "Nope"} failed to
    decode and {"__set__": 1} decoded as a set, and either ended the scheduler."""
    assert decode(encode(value)) == value
    params = SamplingParams.from_dict({"custom_params": value})
    msg = TokenizedGenerateReqInput(rid="r", input_ids=[1], sampling_params=params, seed=0)
    got = decode(encode(msg))
    assert got.sampling_params.custom_params == value
    assert type(got.sampling_params.custom_params) is dict
