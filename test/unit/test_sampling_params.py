"""SamplingParams: parsing, range checks and normalization, with SGLang's names and defaults."""

from __future__ import annotations

from typing import Any

import pytest
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 16

# --- SamplingParams.from_dict -------------------------------------------------------------


def test_from_dict_defaults_match_sglang() -> None:
    params = SamplingParams.from_dict(None)
    assert params == SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (
        128,
        1.0,
        1.0,
        -1,
    )
    assert params.repetition_penalty == 1.0 and params.n == 1 and params.skip_special_tokens


def test_from_dict_none_means_default() -> None:
    params = SamplingParams.from_dict({"temperature": None, "max_new_tokens": None, "stop": None})
    assert params == SamplingParams()


def test_from_dict_accepts_ints_for_floats() -> None:
    params = SamplingParams.from_dict({"temperature": 0, "top_p": 1, "logit_bias": {5: 2}})
    assert isinstance(params.temperature, float) and params.temperature == 0.0
    assert params.logit_bias == {"5": 2.0}


def test_from_dict_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="unknown sampling parameter 'foo'"):
        SamplingParams.from_dict({"foo": 1})


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("temperature", "hot", "float"),
        ("temperature", True, "float"),
        ("max_new_tokens", 1.5, "int"),
        ("top_k", True, "int"),
        ("stop", 5, "str"),
        ("stop", ["a", 1], "str"),
        ("stop_token_ids", "2", "list of int"),
        ("stop_token_ids", [1, True], "list of int"),
        ("ignore_eos", 1, "bool"),
        ("sampling_seed", "7", "int"),
        ("logit_bias", {"a": 1.0}, "token id"),
        ("logit_bias", {"3": "x"}, "float"),
    ],
)
def test_from_dict_rejects_wrong_types(name: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=name) as excinfo:
        SamplingParams.from_dict({name: value})
    assert expected in str(excinfo.value)


@pytest.mark.parametrize(
    "name, value",
    [("regex", "a+"), ("json_schema", '{"type": "object"}'), ("ebnf", 'root ::= "a"')],
)
def test_structured_output_is_accepted(name: str, value: str) -> None:
    params = SamplingParams.from_dict({name: value})
    params.verify(vocab_size=100)
    assert getattr(params, name) == value


def test_stop_regex_is_rejected_only_when_non_empty() -> None:
    SamplingParams.from_dict({"stop_regex": ""})
    SamplingParams.from_dict({"stop_regex": []})
    for value in ("a.*", ["", "b+"]):
        with pytest.raises(ValueError, match="stop_regex is not supported yet"):
            SamplingParams.from_dict({"stop_regex": value})


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("top_k", 1e30, "int"),
        ("sampling_seed", 1e30, "int"),
        ("custom_params", "x", "JSON object"),
        ("custom_params", _nested(900), "at most 32 levels"),
        ("custom_params", {"a": [[[[_nested(30)]]]]}, "at most 32 levels"),  # lists count too
        ("custom_params", {1: "a"}, "keys must be strings"),
        ("custom_params", {"a": float("nan")}, "NaN"),
        ("custom_params", {"a": 2**64}, "64 bits"),
        ("custom_params", {"a": object()}, "JSON"),
        ("stop", ["x"] * 65, "at most 64 strings"),
        ("stop", ["x" * 1025], "at most 1024 characters"),
    ],
)
def test_from_dict_rejects_unsafe_values(name: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=name) as excinfo:
        SamplingParams.from_dict({name: value})
    assert expected in str(excinfo.value)


def test_from_dict_accepts_custom_params_up_to_the_depth_limit() -> None:
    value = {"__type__": "Nope", "__set__": 1, "deep": _nested(31), "list": [1, 2.5, None, True, "s"]}
    assert SamplingParams.from_dict({"custom_params": value}).custom_params == value


def test_from_dict_clamps_logit_bias_to_the_openai_range() -> None:
    params = SamplingParams.from_dict({"logit_bias": {"1": 1e300, "2": -1e300, "3": 5}})
    assert params.logit_bias == {"1": 100.0, "2": -100.0, "3": 5.0}
    params.verify(VOCAB)


@pytest.mark.parametrize(
    "body",
    [
        {"repetition_penalty": 1e-300, "max_new_tokens": 4},
        {"temperature": float("inf")},
        {"sampling_seed": 2**64 - 1},
        {"top_k": 10**30},
    ],
)
def test_values_that_once_crashed_the_scheduler_are_rejected(body: dict) -> None:
    (name,) = [k for k in body if k != "max_new_tokens"]
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(body).verify(VOCAB)


def test_to_dict_round_trips() -> None:
    params = SamplingParams.from_dict(
        {"temperature": 0.5, "stop": ["x"], "stop_token_ids": [3], "logit_bias": {"2": 1.5}}
    )
    assert SamplingParams.from_dict(params.to_dict()) == params
    params.normalize()
    assert params.to_dict()["stop_token_ids"] == [3]


# --- verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("temperature", -1.0, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", 0, "-1 or >= 1"),
        ("top_k", -2, "-1 or >= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("frequency_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -2.5, "[-2, 2]"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.5, "[-2, 2]"),
        ("repetition_penalty", 0.0, "[0.01, 2]"),
        ("repetition_penalty", 2.5, "[0.01, 2]"),
        ("repetition_penalty", 1e-300, "[0.01, 2]"),  # rounds to 0 in float32
        ("repetition_penalty", float("inf"), "[0.01, 2]"),
        ("temperature", float("inf"), ">= 0"),
        ("temperature", 1e39, ">= 0"),  # inf in float32
        ("top_k", 10**30, "-1 or >= 1"),
        ("sampling_seed", 2**64 - 1, "[0, 2**63)"),
        ("sampling_seed", 2**63, "[0, 2**63)"),
        ("sampling_seed", -1, "[0, 2**63)"),
        ("stop", ["x"] * 65, "at most 64 strings"),
        ("stop", "x" * 1025, "at most 1024 characters"),
        ("stop_token_ids", list(range(1025)), "at most 1024 ids"),
        ("logit_bias", {"1": 1e300}, "[-100, 100]"),
        ("logit_bias", {"1": float("nan")}, "[-100, 100]"),
        ("custom_params", [1], "a JSON object"),
        ("max_new_tokens", -1, ">= 0"),
        ("min_new_tokens", -1, "[0, max_new_tokens=128]"),
        ("min_new_tokens", 129, "[0, max_new_tokens=128]"),
        ("n", 0, "[1, 128]"),
        ("n", 129, "[1, 128]"),
        ("stop_token_ids", [VOCAB], f"[0, {VOCAB})"),
        ("stop_token_ids", [-1], f"[0, {VOCAB})"),
        ("logit_bias", {str(VOCAB): 1.0}, f"[0, {VOCAB})"),
    ],
)
def test_verify_rejects_out_of_range(name: str, value: Any, allowed: str) -> None:
    params = SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=name) as excinfo:
        params.verify(VOCAB)
    assert allowed in str(excinfo.value) and "got" in str(excinfo.value)


def test_verify_message_format() -> None:
    with pytest.raises(ValueError, match=r"^temperature must be >= 0 \(and at most 10000\), got -1.0$"):
        SamplingParams(temperature=-1.0).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5).verify(VOCAB)


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 0.0),
        ("top_p", 1.0),
        ("top_k", -1),
        ("top_k", 1),
        ("min_p", 1.0),
        ("frequency_penalty", -2.0),
        ("presence_penalty", 2.0),
        ("repetition_penalty", 2.0),
        ("repetition_penalty", 0.01),
        ("sampling_seed", 0),
        ("sampling_seed", 2**63 - 1),
        ("stop", ["x" * 1024] * 64),
        ("custom_params", {"__type__": "Nope", "__set__": 1}),
        ("max_new_tokens", 0),
        ("min_new_tokens", 128),
        ("stop_token_ids", [0, VOCAB - 1]),
        ("logit_bias", {"0": -100.0}),
    ],
)
def test_verify_accepts_boundaries(name: str, value: Any) -> None:
    SamplingParams(**{name: value}).verify(VOCAB)


# --- normalize ------------------------------------------------------------------------------


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens, "stop strings must be encoded without special tokens"
        return [ord(c) for c in text]


def test_normalize_stop_strings() -> None:
    params = SamplingParams(stop="END", stop_token_ids=[2, 2])
    params.normalize(CharTokenizer())
    assert params.stop == ["END"] and params.stop_token_ids == {2}
    assert params.stop_str_max_len == 3
    params = SamplingParams(stop=["", "ab"])
    params.normalize()
    assert params.stop == ["ab"]
    params.normalize()  # idempotent
    assert params.stop == ["ab"] and params.stop_token_ids == set()


def test_normalize_temperature_zero_is_greedy() -> None:
    params = SamplingParams(temperature=0.0, top_k=50)
    assert params.is_greedy
    params.normalize()
    assert (params.top_k, params.temperature, params.is_greedy) == (1, 1.0, True)
    params.verify(VOCAB)
    assert not SamplingParams(temperature=0.5).is_greedy
    assert SamplingParams(temperature=0.5, top_k=1).is_greedy
