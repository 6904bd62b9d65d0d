"""Constrained decoding (regex, json_schema) through the offline Engine on a random-weight model:
whatever the weights, the output follows the grammar."""

import json
import re

import pytest

pytestmark = pytest.mark.slow  # engines on a tiny model

REGEX = "[0-9]{3}-[a-z]{2,5}"
SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["age", "color"],
    "additionalProperties": False,
}
PROMPT = "The quick brown fox jumps over the lazy dog. Then"


def check_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"age", "color"}, text
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 150
    assert value["color"] in SCHEMA["properties"]["color"]["enum"]


def assert_ended_by_grammar(out: dict) -> None:
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop", out
    assert reason["matched"] in out["output_ids"][-1:], out


def test_regex_greedy_sampled_and_n(tiny_engine):
    params = {"regex": REGEX, "max_new_tokens": 32}
    outs = [tiny_engine.generate(PROMPT, {**params, "temperature": 0})]
    outs += [tiny_engine.generate(PROMPT, {**params, "temperature": 1.0, "sampling_seed": s}) for s in range(3)]
    outs += tiny_engine.generate(PROMPT, {**params, "temperature": 1.0, "sampling_seed": 7, "n": 3})
    for out in outs:
        assert re.fullmatch(REGEX, out["text"]), out["text"]
        assert_ended_by_grammar(out)
    assert len({o["text"] for o in outs}) > 1, "sampling should vary the output"


def test_json_schema_greedy_and_sampled(engine_factory, tiny_llama):
    # without the whitespace limit a random model fills the JSON with whitespace until max_new_tokens
    engine = engine_factory(
        model_path=tiny_llama, dtype="float32", max_total_tokens=4096, constrained_json_disable_any_whitespace=True
    )
    params = {"json_schema": json.dumps(SCHEMA), "max_new_tokens": 64}
    outs = [engine.generate(PROMPT, {**params, "temperature": 0})]
    outs += [engine.generate(PROMPT, {**params, "temperature": 1.0, "sampling_seed": s}) for s in range(3)]
    for out in outs:
        check_schema(out["text"])
        assert_ended_by_grammar(out)


def test_max_new_tokens_still_bounds_and_streaming_follows(tiny_engine):
    out = tiny_engine.generate(PROMPT, {"regex": REGEX, "max_new_tokens": 2, "temperature": 0})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert re.fullmatch("[0-9]+", out["text"]), out["text"]
    full = tiny_engine.generate(PROMPT, {"regex": REGEX, "max_new_tokens": 32, "temperature": 0})
    chunks = list(tiny_engine.generate(PROMPT, {"regex": REGEX, "max_new_tokens": 32, "temperature": 0}, stream=True))
    assert len(chunks) > 1 and chunks[-1]["text"] == full["text"]


def test_bad_grammar_is_rejected_before_the_scheduler(tiny_engine):
    with pytest.raises(ValueError, match="regex is not a valid grammar"):
        tiny_engine.generate(PROMPT, {"regex": "[0-9"})


def test_tknp_matches_plain_engine(engine_factory, tiny_llama):
    from sglang import Engine

    params = [
        {"regex": REGEX, "max_new_tokens": 32, "temperature": 0},
        {"json_schema": json.dumps(SCHEMA), "max_new_tokens": 48, "temperature": 0},
    ]
    prompts = [PROMPT, "Hello there", "One two three four", "A"]
    args = dict(
        model_path=tiny_llama, dtype="float32", max_total_tokens=4096, constrained_json_disable_any_whitespace=True
    )
    plain = engine_factory(**args)
    expected = [[o["output_ids"] for o in plain.generate(prompts, p)] for p in params]
    with Engine(**args, tknp_size=2, load_balance_method="round_robin", log_level="warning") as tknp:
        got = [[o["output_ids"] for o in tknp.generate(prompts, p)] for p in params]
    assert got == expected
