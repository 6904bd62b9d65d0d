"""A structured-output suite: many JSON schemas and regexes on the embedded default model
(SmolLM2-135M-Instruct), greedy and sampled, every output checked against its grammar; the same
constrained workload across TKNP and TP sizes, under chunked prefill and retraction; and the
errors a bad grammar gives at the Engine."""

import json
import re

import jsonschema
import pytest
from conftest import assert_kv_pool_clean

pytestmark = pytest.mark.slow  # engines on the default model and on tiny ones

# Every string, array and number is bounded so that even a temperature-1.0 sample of a 135M
# model reaches the end of the grammar well within MAX_NEW_TOKENS.
SCHEMAS = {
    "person": (
        "Describe a fictional person as JSON with their name and age.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
        },
    ),
    "nested_address": (
        "Give the name and postal address of a famous library as JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 16},
                        "zip": {"type": "string", "pattern": "[0-9]{5}"},
                    },
                    "required": ["city", "zip"],
                },
            },
            "required": ["name", "address"],
        },
    ),
    "tag_array": (
        "List a few tags for a blog post about cooking pasta, as JSON.",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
            },
            "required": ["tags"],
        },
    ),
    "enums": (
        "Pick a T-shirt color and size, as JSON.",
        {
            "type": "object",
            "properties": {
                "color": {"type": "string", "enum": ["red", "green", "blue", "black"]},
                "size": {"enum": ["S", "M", "L", "XL"]},
            },
            "required": ["color", "size"],
        },
    ),
    "bounded_numbers": (
        "Report today's weather in Paris as JSON: temperature in Celsius and humidity in percent.",
        {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": -50, "maximum": 60},
                "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["temperature", "humidity"],
        },
    ),
    "optional_fields": (
        "Describe a book as JSON: its title, and if you know them its year and page count.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 32},
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                "pages": {"type": "integer", "minimum": 1, "maximum": 5000},
            },
            "required": ["title"],
        },
    ),
    "refs": (
        "Give the start and end points of a line segment as JSON.",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -100, "maximum": 100},
                        "y": {"type": "integer", "minimum": -100, "maximum": 100},
                    },
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
        },
    ),
    "booleans": (
        "Describe a cafe as JSON: is it open now, and does it have wifi?",
        {
            "type": "object",
            "properties": {"is_open": {"type": "boolean"}, "has_wifi": {"type": "boolean"}},
            "required": ["is_open", "has_wifi"],
        },
    ),
    "any_of": (
        "Give an answer as JSON: either a small number or a short word.",
        {
            "type": "object",
            "properties": {
                "answer": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 8}]
                }
            },
            "required": ["answer"],
        },
    ),
    "array_of_objects": (
        "Write a short shopping list as JSON, with item names and quantities.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 16},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                        },
                        "required": ["name", "qty"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["items"],
        },
    ),
    "top_level_array": (
        "Give between two and five exam scores out of 100, as a JSON array.",
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 5},
    ),
    "const_null_and_date": (
        "Report the status of a finished job as JSON, with the date it finished.",
        {
            "type": "object",
            "properties": {
                "status": {"const": "done"},
                "error": {"type": "null"},
                "finished": {"type": "string", "format": "date"},
            },
            "required": ["status", "error", "finished"],
        },
    ),
}

REGEXES = {
    "date": (
        "What is a date in the summer of 2021? Answer as YYYY-MM-DD.",
        r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    ),
    "phone": ("Give a US phone number.", r"\(\d{3}\) \d{3}-\d{4}"),
    "email": ("Give an email address for a support team.", r"[a-z0-9._]{1,16}@[a-z0-9]{1,12}\.(com|org|net)"),
    "ipv4": (
        "Give the IP address of a home router.",
        r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    ),
    "hex_color": ("What is the hex code of a dark blue color?", r"#[0-9a-fA-F]{6}"),
    "yes_no": ("Is the Earth round? Answer yes, no or maybe.", r"(yes|no|maybe)"),
    "decimal": ("What does a cup of coffee cost in dollars?", r"-?(0|[1-9]\d{0,5})\.\d{2}"),
    "time": ("At what time does a bakery open? Answer as HH:MM.", r"([01]\d|2[0-3]):[0-5]\d"),
    "full_name": ("Give the first and last name of a famous scientist.", r"[A-Z][a-z]{1,11} [A-Z][a-z]{1,11}"),
    "zip_code": ("Give a US ZIP code.", r"\d{5}(-\d{4})?"),
    "version": ("What is a version number of Python?", r"\d{1,2}\.\d{1,2}\.\d{1,3}"),
    "multiple_choice": ("Which planet is largest? A) Mars B) Jupiter C) Venus", r"The answer is [ABC]\."),
}

MAX_NEW_TOKENS = 96  # more than the longest output any grammar of the suite allows
GREEDY = {"temperature": 0}
SAMPLED = [{"temperature": 1.0, "sampling_seed": seed} for seed in (1, 2)]
# The whitespace limit: without it a temperature-1.0 sample of the 135M model (or any sample
# of a random one) can fill a JSON object with newlines and spaces, which the grammar allows
# between any two tokens, and run into max_new_tokens instead of closing the object.
ENGINE_ARGS = dict(dtype="float32", max_total_tokens=8192, constrained_json_disable_any_whitespace=True)


def suite_requests(tokenizer, samplings: list[dict]) -> tuple[list[str], list[dict]]:
    """(chat prompts, sampling params): every schema and regex of the suite with every sampling."""
    grammars = [("json_schema", q, json.dumps(schema)) for q, schema in SCHEMAS.values()]
    grammars += [("regex", q, regex) for q, regex in REGEXES.values()]
    prompts, params = [], []
    for kind, question, text in grammars:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        for sampling in samplings:
            prompts.append(prompt)
            params.append({kind: text, "max_new_tokens": MAX_NEW_TOKENS, **sampling})
    return prompts, params


def check_follows_grammar(params: dict, out: dict) -> None:
    """The output is in the language of the request's grammar, and the grammar ended it."""
    text = out["text"]
    if "regex" in params:
        assert re.fullmatch(params["regex"], text), (params["regex"], text)
    else:
        jsonschema.validate(json.loads(text), json.loads(params["json_schema"]))
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop" and reason["matched"] in out["output_ids"][-1:], (text, reason)


def assert_ranks_clean(engine) -> None:
    """assert_kv_pool_clean for an engine whose ranks are processes: nothing running or
    waiting, and after a flush every KV slot of every rank is free."""
    assert engine.flush_cache()
    info = engine.get_server_info()
    for rank in info["ranks"] or [info]:
        assert rank["num_running_reqs"] == rank["num_waiting_reqs"] == 0, rank
        assert rank["kv_tokens_used"] == rank["kv_tokens_cached"] == 0, rank
        assert rank["kv_tokens_free"] == rank["max_total_num_tokens"], rank


# ---- the default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_engine():
    from sglang import Engine

    engine = Engine(**ENGINE_ARGS, log_level="warning")  # no model_path: the embedded default
    yield engine
    assert_kv_pool_clean(engine)
    engine.shutdown()


@pytest.fixture(scope="module")
def greedy_outputs(default_engine) -> list[dict]:
    """The greedy run of the suite, also the oracle of the TKNP test."""
    prompts, params = suite_requests(default_engine.tokenizer, [GREEDY])
    return default_engine.generate(prompts, params)


def test_default_model_follows_every_grammar_greedy_and_sampled(default_engine, greedy_outputs):
    _, params = suite_requests(default_engine.tokenizer, [GREEDY])
    for p, out in zip(params, greedy_outputs):
        check_follows_grammar(p, out)
    # One batch of every sampled request; the greedy run left their prompts in the prefix cache.
    prompts, params = suite_requests(default_engine.tokenizer, SAMPLED)
    sampled = default_engine.generate(prompts, params)
    for p, out in zip(params, sampled):
        check_follows_grammar(p, out)
    greedy_texts = {o["text"] for o in greedy_outputs}
    assert sum(o["text"] not in greedy_texts for o in sampled) >= len(sampled) // 2, "sampling should vary the output"
    assert_kv_pool_clean(default_engine)


def test_default_model_tknp_2_matches_tknp_1(default_engine, greedy_outputs):
    from sglang import Engine

    prompts, params = suite_requests(default_engine.tokenizer, [GREEDY])
    with Engine(**ENGINE_ARGS, tknp_size=2, load_balance_method="round_robin", log_level="warning") as tknp:
        outs = tknp.generate(prompts, params)
        assert tknp.get_server_info()["placements"] == [len(prompts) // 2] * 2, "both ranks serve requests"
        assert_ranks_clean(tknp)
    for i, (expected, got) in enumerate(zip(greedy_outputs, outs)):
        assert got["output_ids"] == expected["output_ids"], (i, expected["text"], got["text"])


def test_bad_grammars_are_value_errors_naming_the_field(default_engine):
    """What test_grammar checks on SamplingParams, here through Engine.generate, and what it does
    not: a schema given as a dict, an unsupported regex feature, and one bad request in a batch,
    which rejects the whole batch before any of it reaches the scheduler."""
    cases = [
        ({"json_schema": "{'type': 'object'}"}, "json_schema is not valid JSON"),
        (
            {"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}})},
            'json_schema is not a valid grammar: Unsupported type "strin"',
        ),
        (
            {"json_schema": json.dumps({"type": "integer", "minimum": 10, "maximum": 5})},
            "json_schema is not a valid grammar: Invalid range",
        ),
        ({"json_schema": {"type": "object"}}, "'json_schema' must be a str, got dict"),
        ({"regex": r"(a)\1"}, "regex is not a valid grammar: .*Backreference is not supported"),
        ({"regex": "a", "json_schema": "{}"}, "regex and json_schema are mutually exclusive"),
        ({"json_schema": "{}", "ebnf": 'root ::= "a"'}, "json_schema and ebnf are mutually exclusive"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            default_engine.generate("Hello", {**params, "max_new_tokens": 4})
    good = {"regex": "[a-z]{3}", "max_new_tokens": 8}
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        default_engine.generate(["Hello", "Hi"], [good, {"json_schema": "{"}])
    sched = default_engine.scheduler
    assert not sched.grammar_queue and not sched.waiting and not sched.running
    assert re.fullmatch("[a-z]{3}", default_engine.generate("Hello", good)["text"])
    assert_kv_pool_clean(default_engine)


# ---- chunked prefill, retraction and TP, on a tiny random model -----------------------------

DIGITS_ARRAY = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 16,
    "maxItems": 16,
}
# (grammar, max_new_tokens). The tokenizer splits digits, so the first three grammars give
# outputs of a fixed length (49 to 61 tokens with the stop token), and max_new_tokens only just
# above it keeps the scheduler's decode reserve (a share of max_new_tokens) below what the
# requests really take: in a 256-token pool some must be retracted.
TINY_GRAMMARS = [
    ({"regex": r"\d{60}"}, 64),
    ({"regex": r"\d{4}(-\d{4}){9}"}, 52),
    ({"json_schema": json.dumps(DIGITS_ARRAY)}, 52),
    ({"json_schema": json.dumps(SCHEMAS["refs"][1])}, MAX_NEW_TOKENS),
    ({"json_schema": json.dumps(SCHEMAS["nested_address"][1])}, MAX_NEW_TOKENS),
]


def tiny_requests(tokenizer) -> tuple[list[list[int]], list[dict]]:
    """Greedy constrained requests whose prompts (24 to 60 tokens) span several 16-token chunks."""
    words = tokenizer.encode(" ".join(f"word{(j * 7) % 997}" for j in range(100)))
    prompts, params = [], []
    for i in range(2 * len(TINY_GRAMMARS)):
        grammar, max_new_tokens = TINY_GRAMMARS[i % len(TINY_GRAMMARS)]
        prompts.append(words[i : i + 24 + 4 * i])
        params.append({**grammar, "max_new_tokens": max_new_tokens, **GREEDY})
    return prompts, params


@pytest.fixture(scope="module")
def tiny_path(make_tiny_model) -> str:
    return str(make_tiny_model("llama", seed=4))  # 4 heads, 2 KV heads: splits over TP 2


@pytest.fixture(scope="module")
def tiny_expected(tiny_path) -> list[dict]:
    """The tiny workload on a pool that holds it all, prompts prefilled whole."""
    from sglang import Engine

    engine = Engine(model_path=tiny_path, **{**ENGINE_ARGS, "chunked_prefill_size": -1}, log_level="warning")
    prompts, params = tiny_requests(engine.tokenizer)
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert engine.scheduler.num_retractions == 0
    assert_kv_pool_clean(engine)
    engine.shutdown()
    for p, out in zip(params, outs):
        check_follows_grammar(p, out)
    return outs


def test_chunked_prefill_and_retraction_keep_constrained_tokens(engine_factory, tiny_path, tiny_expected):
    engine = engine_factory(
        model_path=tiny_path, **{**ENGINE_ARGS, "max_total_tokens": 256, "chunked_prefill_size": 16}
    )
    prompts, params = tiny_requests(engine.tokenizer)
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert engine.scheduler.num_retractions > 0, "the small pool was meant to force retraction"
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in tiny_expected]
    for p, out in zip(params, outs):
        check_follows_grammar(p, out)


def test_tp_2_matches_tp_1_on_constrained_requests(tiny_path, tiny_expected):
    from sglang import Engine

    with Engine(model_path=tiny_path, **ENGINE_ARGS, tp_size=2, log_level="warning") as engine:
        prompts, params = tiny_requests(engine.tokenizer)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        # A grammar that takes most of a second to compile, beside a request that runs meanwhile:
        # TP replicas whose compiles ended in different steps scheduled different batches, and
        # hung in the forward's all-reduce (now every replica waits for the compile).
        slow = engine.generate(
            ["Hello there", "The quick brown fox"],
            [{"regex": "[a-z]{1,300}", "max_new_tokens": 8, **GREEDY}, {"max_new_tokens": 32, "ignore_eos": True}],
        )
        assert re.fullmatch("[a-z]+", slow[0]["text"]) and slow[1]["meta_info"]["completion_tokens"] == 32
        assert_ranks_clean(engine)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in tiny_expected]
