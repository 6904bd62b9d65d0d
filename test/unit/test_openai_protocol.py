"""The OpenAI-compatible layer without a server: request -> GenerateReqInput conversion, and
response / SSE stream assembly from canned engine results.

`FakeTokenizerManager` stands in for TokenizerManager: its generate_request records the
GenerateReqInput and replays cumulative results, round-robin over the choices as a batched
engine would interleave them. The real tokenizer renders the chat template.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest
from pydantic import ValidationError
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionStreamResponse,
)
from sglang.srt.entrypoints.openai.serving import (
    OpenAIError,
    model_card,
    models_list,
    validation_error_response,
)
from sglang.srt.entrypoints.openai.serving_chat import chat_completions
from sglang.srt.entrypoints.openai.serving_completions import completions
from sglang.srt.sampling.sampling_params import SamplingParams

MODEL = "smollm2"
MODEL_PATH = "/models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    from sglang.srt.model_loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


def engine_results(
    pieces: list[str],
    *,
    prompt_tokens: int = 5,
    cached_tokens: int = 0,
    finish: Optional[dict] = None,
    logprobs: bool = False,
    input_logprobs: Optional[list] = None,
) -> list[dict]:
    """The cumulative results one request goes through: one token per piece."""
    finish = finish or {"type": "length", "length": len(pieces)}
    out = []
    for step in range(max(len(pieces), 1)):
        done = pieces[: step + 1]
        meta = {
            "id": "rid",
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(done),
            "cached_tokens": cached_tokens,
            "finish_reason": finish if step + 1 >= len(pieces) else None,
        }
        if logprobs:
            meta["output_token_logprobs"] = [[-0.5 * (j + 1), 100 + j, p] for j, p in enumerate(done)]
            meta["output_top_logprobs"] = [
                [[-0.1, 900 + j, f"top{j}"], [-0.5 * (j + 1), 100 + j, p]] for j, p in enumerate(done)
            ]
            meta["input_token_logprobs"] = input_logprobs or []
            meta["input_top_logprobs"] = [None if e[0] is None else [[-0.2, 7, "alt"]] for e in input_logprobs or []]
        out.append({"text": "".join(done), "output_ids": [100 + j for j in range(len(done))], "meta_info": meta})
    return out


class FakeTokenizerManager:
    def __init__(self, tokenizer: Any, outputs: Optional[list[list[dict]]] = None, context_len: int = 2048):
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.served_model_name = MODEL
        self.model_path = MODEL_PATH
        self.chat_template: Optional[str] = None
        self.tool_call_parser: Optional[str] = None
        self.outputs = outputs or [engine_results(["Hello", " world"])]
        self.requests: list = []
        self.error: Optional[Exception] = None  # raised before anything is yielded
        self.fail_after: Optional[int] = None  # raise RuntimeError after this many yields
        self.closed = False

    async def generate_request(self, obj):
        self.requests.append(obj)
        try:
            if self.error is not None:
                raise self.error
            if not obj.stream:
                for index, seq in enumerate(self.outputs):
                    yield index, seq[-1]
                return
            yielded = 0
            for step in range(max(len(seq) for seq in self.outputs)):
                for index, seq in enumerate(self.outputs):
                    if step < len(seq):
                        if self.fail_after is not None and yielded == self.fail_after:
                            raise RuntimeError("scheduler died")
                        yield index, seq[step]
                        yielded += 1
        finally:
            self.closed = True


def run(coro):
    return asyncio.run(coro)


def complete(tm, **body):
    return run(completions(tm, CompletionRequest.model_validate(body)))


def chat(tm, **body):
    return run(chat_completions(tm, ChatCompletionRequest.model_validate(body)))


def stream_events(tm, handler, request_cls, **body) -> list:
    """The SSE events of a streaming call, checked for framing; "[DONE]" stays a string."""

    async def go():
        stream = await handler(tm, request_cls.model_validate({**body, "stream": True}))
        return b"".join([part async for part in stream])

    raw = run(go()).decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), "only data lines, no comments"
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    for chunk in chunks:
        if "error" not in chunk:
            assert_matches_protocol(chunk)
    return chunks + ["[DONE]"]


def assert_matches_protocol(chunk: dict) -> None:
    """Stream chunks are built as dicts for speed; they must be exactly what the models give."""
    model = {"text_completion": CompletionStreamResponse, "chat.completion.chunk": ChatCompletionChunk}[chunk["object"]]
    expected = model.model_validate(chunk).model_dump()
    if "usage" not in chunk:
        del expected["usage"]
    assert chunk == expected


def error_of(call) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        call()
    return info.value


# ---- request validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "n": 129}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"temperature": 1}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": "x", "stop": [""]}, "stop"),
    ],
)
def test_completion_request_errors_name_the_field(body, param):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    status, out = validation_error_response(info.value)
    assert status == 400
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"].startswith(param + ":")


def test_chat_request_errors_name_nested_fields():
    for body, param in [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}, {"content": "hi"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, "top_logprobs"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": [{"role": "user", "content": "a"}], "tool_choice": "always"}, "tool_choice"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
    ]:
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate(body)
        assert validation_error_response(info.value)[1]["error"]["param"] == param


def test_fastapi_validation_errors_drop_the_body_prefix():
    from fastapi.exceptions import RequestValidationError

    exc = RequestValidationError([{"type": "missing", "loc": ("body", "messages"), "msg": "Field required"}])
    status, out = validation_error_response(exc)
    assert status == 400 and out["error"]["param"] == "messages"
    assert out["error"]["message"] == "messages: Field required"
    bad_json = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}]
    )
    assert "not valid JSON" in validation_error_response(bad_json)[1]["error"]["message"]


def test_unknown_fields_are_ignored_and_sglang_extensions_reach_the_engine(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    complete(
        tm,
        model=MODEL,
        prompt="Hi",
        max_tokens=7,
        temperature=0.0,
        top_p=0.9,
        n=1,
        stop=["\n"],
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"11": -100},
        user="u1",
        made_up_field=[1],
        ignore_eos=True,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        min_tokens=2,
        stop_token_ids=[2],
        skip_special_tokens=False,
        no_stop_trim=True,
    )
    obj = tm.requests[0]
    assert obj.text == "Hi" and obj.input_ids is None and obj.rid.startswith("cmpl-")
    assert obj.sampling_params == {
        "max_new_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.9,
        "n": 1,
        "stop": ["\n"],
        "sampling_seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"11": -100.0},
        "ignore_eos": True,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "min_new_tokens": 2,
        "stop_token_ids": [2],
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    assert not obj.return_logprob and obj.stream is False
    SamplingParams.from_dict(obj.sampling_params).verify(vocab_size=49152)  # the engine's names


def test_defaults_and_top_p_zero(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    complete(tm, prompt="Hi")
    assert tm.requests[0].sampling_params == {"max_new_tokens": 16, "n": 1}  # OpenAI's default max_tokens
    complete(tm, prompt="Hi", top_p=0)
    assert tm.requests[1].sampling_params == {"max_new_tokens": 16, "n": 1, "top_k": 1}


def test_engine_value_errors_are_400_and_dead_backend_is_503(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    tm.error = ValueError("regex: structured output (regex/json_schema/ebnf) is not supported yet")
    err = error_of(lambda: complete(tm, prompt="Hi", regex="[a-z]+"))
    assert err.status_code == 400 and "not supported yet" in err.message
    assert tm.requests[0].sampling_params["regex"] == "[a-z]+"
    # A streaming request is rejected before the stream starts: a plain 400, not an SSE error.
    err = error_of(lambda: run(completions(tm, CompletionRequest(prompt="Hi", stream=True))))
    assert err.status_code == 400
    tm.error = RuntimeError("the scheduler process died")
    assert error_of(lambda: complete(tm, prompt="Hi")).status_code == 503


def test_model_names(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    for name in (MODEL, MODEL_PATH, None, ""):
        assert complete(tm, prompt="Hi", model=name)["model"] == MODEL
    err = error_of(lambda: complete(tm, prompt="Hi", model="gpt-4"))
    assert err.status_code == 404 and err.param == "model"
    assert err.body() == {"error": {"message": err.message, "type": "not_found_error", "param": "model", "code": 404}}
    listing = models_list(tm)
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [MODEL]
    assert listing["data"][0]["max_model_len"] == 2048 and listing["data"][0]["root"] == MODEL_PATH
    assert model_card(tm, MODEL_PATH)["id"] == MODEL
    assert error_of(lambda: model_card(tm, "nope")).status_code == 404


# ---- /v1/completions -------------------------------------------------------------------------


def test_completion_prompt_forms(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    complete(tm, prompt=[1, 2, 3])
    assert tm.requests[-1].input_ids == [1, 2, 3] and tm.requests[-1].text is None
    tm.outputs = [engine_results(["a"]), engine_results(["b"])]
    complete(tm, prompt=[[1, 2], [3]])
    assert tm.requests[-1].input_ids == [[1, 2], [3]]
    out = complete(tm, prompt=["x", "y"])
    assert tm.requests[-1].text == ["x", "y"] and len(set(tm.requests[-1].rid)) == 2
    assert [c["text"] for c in out["choices"]] == ["a", "b"]
    assert error_of(lambda: complete(tm, prompt="x", suffix="!")).param == "suffix"
    assert error_of(lambda: complete(tm, prompt="x", best_of=2)).param == "best_of"
    complete(tm, prompt=["x", "y"], best_of=1)  # bench_serving sends best_of=1


def test_completion_response_n_samples_over_two_prompts(tokenizer):
    # prompt-major: choices 0,1 sample prompt 0 (4 tokens), choices 2,3 prompt 1 (6 tokens)
    stop = {"type": "stop", "matched": "\n"}
    tm = FakeTokenizerManager(
        tokenizer,
        [
            engine_results(["a", "b"], prompt_tokens=4, finish=stop),
            engine_results(["c"], prompt_tokens=4, cached_tokens=3, finish={"type": "stop", "matched": 2}),
            engine_results(["d", "e", "f"], prompt_tokens=6),
            engine_results(["g"], prompt_tokens=6),
        ],
    )
    out = complete(tm, prompt=["p0", "p1"], n=2, max_tokens=3)
    assert tm.requests[0].sampling_params["n"] == 2
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == MODEL
    assert [(c["index"], c["text"], c["finish_reason"], c["matched_stop"]) for c in out["choices"]] == [
        (0, "ab", "stop", "\n"),
        (1, "c", "stop", 2),
        (2, "def", "length", None),
        (3, "g", "length", None),
    ]
    assert all(c["logprobs"] is None for c in out["choices"])
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def test_completion_abort(tokenizer):
    abort = {"type": "abort", "message": "the server is shutting down"}
    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "b"], finish=abort)])
    assert complete(tm, prompt="x")["choices"][0]["finish_reason"] == "abort"
    tm.outputs = [
        [
            {
                "text": "",
                "output_ids": [],
                "meta_info": {"prompt_tokens": 3, "completion_tokens": 0, "finish_reason": abort},
            }
        ]
    ]
    err = error_of(lambda: complete(tm, prompt="x"))
    assert err.status_code == 500 and err.message == abort["message"]


def test_completion_echo_and_legacy_logprobs(tokenizer):
    prompt_ids = tokenizer.encode("Hi there")
    input_lps = [[None, prompt_ids[0], "Hi"], [-1.5, prompt_ids[1], " there"]]
    tm = FakeTokenizerManager(tokenizer, [engine_results(["!", "?"], logprobs=True, input_logprobs=input_lps)])
    out = complete(tm, prompt="Hi there", echo=True, logprobs=1, max_tokens=2)
    obj = tm.requests[0]
    assert (
        obj.return_logprob and obj.logprob_start_len == 0 and obj.top_logprobs_num == 1 and obj.return_text_in_logprobs
    )
    choice = out["choices"][0]
    assert choice["text"] == "Hi there!?"
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there", "!", "?"],
        "token_logprobs": [None, -1.5, -0.5, -1.0],
        # the top-k plus the sampled token, as OpenAI documents
        "top_logprobs": [None, {"alt": -0.2, " there": -1.5}, {"top0": -0.1, "!": -0.5}, {"top1": -0.1, "?": -1.0}],
        "text_offset": [0, 2, 8, 9],
    }
    # Without echo: output tokens only, no input logprobs requested.
    complete(tm, prompt="Hi there", logprobs=0)
    assert tm.requests[1].logprob_start_len is None and tm.requests[1].top_logprobs_num == 0
    # Echo of a token-id prompt is its decoded text.
    tm.outputs = [engine_results(["!"])]
    assert complete(tm, prompt=prompt_ids, echo=True)["choices"][0]["text"] == "Hi there!"


def completion_stream_texts(events) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    return texts


def test_completion_stream(tokenizer):
    tm = FakeTokenizerManager(
        tokenizer, [engine_results(["He", "llo", "!"]), engine_results(["Yo"], finish={"type": "stop", "matched": 2})]
    )
    events = stream_events(tm, completions, CompletionRequest, prompt="Hi", n=2)
    chunks = events[:-1]
    assert all(len(c["choices"]) == 1 and "usage" not in c for c in chunks)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert completion_stream_texts(events) == {0: "Hello!", 1: "Yo"}
    finishes = [
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"], c["choices"][0]["matched_stop"])
        for c in chunks
        if c["choices"][0]["finish_reason"]
    ]
    assert sorted(finishes) == [(0, "length", None), (1, "stop", 2)]
    for index in (0, 1):  # the finish chunk is each choice's last, and carries no text
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[-1]["finish_reason"] and mine[-1]["text"] == "" and not any(c["finish_reason"] for c in mine[:-1])
    assert tm.closed


def test_completion_stream_usage_and_logprobs(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "bc", "d"], prompt_tokens=4, logprobs=True)])
    events = stream_events(
        tm, completions, CompletionRequest, prompt="Hi", logprobs=1, stream_options={"include_usage": True}
    )
    *chunks, usage_chunk, done = events
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 4
    assert usage_chunk["usage"]["completion_tokens"] == 3 and usage_chunk["usage"]["total_tokens"] == 7
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["text"]]
    assert [t for lp in lps for t in lp["tokens"]] == ["a", "bc", "d"]
    assert [o for lp in lps for o in lp["text_offset"]] == [0, 1, 3]
    assert [v for lp in lps for v in lp["token_logprobs"]] == [-0.5, -1.0, -1.5]
    # continuous_usage_stats: every chunk reports the counts so far
    events = stream_events(
        tm,
        completions,
        CompletionRequest,
        prompt="Hi",
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    assert [e["usage"]["completion_tokens"] for e in events[:3]] == [1, 2, 3]


def test_completion_stream_echo(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results([""], finish={"type": "length", "length": 0})])
    events = stream_events(tm, completions, CompletionRequest, prompt="Hi", echo=True, max_tokens=0)
    assert completion_stream_texts(events) == {0: "Hi"}
    assert tm.requests[0].sampling_params["max_new_tokens"] == 0


def test_error_after_the_stream_started(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "b", "c"])])
    tm.fail_after = 2
    events = stream_events(tm, completions, CompletionRequest, prompt="Hi")
    assert [c["choices"][0]["text"] for c in events[:2]] == ["a", "b"]
    assert events[2]["error"]["message"] == "scheduler died" and events[2]["error"]["code"] == 503
    assert events[3] == "[DONE]" and len(events) == 4 and tm.closed


def test_client_disconnect_closes_the_engine_stream(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "b", "c"])])

    async def go():
        stream = await completions(tm, CompletionRequest(prompt="Hi", stream=True))
        await anext(stream)
        assert not tm.closed
        await stream.aclose()  # what the server does when the client goes away

    run(go())
    assert tm.closed


# ---- /v1/chat/completions --------------------------------------------------------------------


def rendered(tokenizer, messages, **kwargs) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def test_chat_renders_the_template_and_sends_token_ids(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["Hi", "!"], prompt_tokens=30)])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = chat(tm, model=MODEL, messages=messages, temperature=0, seed=1, stop="\n")
    obj = tm.requests[0]
    ids = rendered(tokenizer, messages)
    assert obj.input_ids == ids and obj.text is None and obj.rid.startswith("chatcmpl-")
    # no max_tokens: whatever the context has room for
    assert obj.sampling_params == {
        "max_new_tokens": 2048 - len(ids),
        "temperature": 0.0,
        "n": 1,
        "stop": "\n",
        "sampling_seed": 1,
    }
    assert out["object"] == "chat.completion" and out["id"] == obj.rid
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi!"},
            "logprobs": None,
            "finish_reason": "length",
            "matched_stop": None,
        }
    ]
    assert out["usage"]["prompt_tokens"] == 30 and out["usage"]["completion_tokens"] == 2


def test_chat_max_tokens_and_content_parts(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    chat(
        tm,
        messages=[{"role": "developer", "content": "Sys"}, {"role": "user", "content": parts}],
        max_tokens=5,
        max_completion_tokens=9,
    )
    obj = tm.requests[0]
    assert obj.sampling_params["max_new_tokens"] == 9  # max_completion_tokens wins
    expected = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hello\nthere"}]
    assert obj.input_ids == rendered(tokenizer, expected)
    chat(tm, messages=[{"role": "user", "content": "x"}], max_tokens=5)
    assert tm.requests[1].sampling_params["max_new_tokens"] == 5


def test_chat_template_override_and_continuation(tokenizer):
    tm = FakeTokenizerManager(tokenizer)
    tm.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    chat(tm, messages=[{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(tm.requests[0].input_ids) == "[user] Hi\n[assistant] "
    tm.chat_template = None
    # A conversation ending with the assistant's words is continued from them.
    chat(tm, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}])
    assert tokenizer.decode(tm.requests[1].input_ids).endswith("<|im_start|>assistant\nWell,")
    # ... unless the client asks for a new assistant turn.
    chat(
        tm,
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}],
        continue_final_message=False,
    )
    assert tokenizer.decode(tm.requests[2].input_ids).endswith("Well,<|im_end|>\n<|im_start|>assistant\n")
    err = error_of(lambda: chat(tm, messages=[{"role": "user", "content": "Hi"}], continue_final_message=True))
    assert err.param == "continue_final_message"


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"tools": 5}},
            "chat_template_kwargs.tools",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"documents": [1]}},
            "chat_template_kwargs.documents",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "messages[0].content[1].type",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            "messages[1].tool_call_id",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
                ]
            },
            "messages[0].tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}, "regex": "a"},
            "response_format",
        ),
        (
            {
                "messages": [{"role": "user", "content": "a"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            },
            "response_format.json_schema.schema",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "a"}], "model": "other"}, "model"),
    ],
)
def test_chat_rejections(tokenizer, body, param):
    tm = FakeTokenizerManager(tokenizer)
    err = error_of(lambda: chat(tm, **body))
    assert err.param == param and err.status_code == (404 if param == "model" else 400)
    assert not tm.requests
    chat(tm, messages=[{"role": "user", "content": "a"}], response_format={"type": "text"})


def test_chat_response_format_becomes_a_json_schema_grammar(tokenizer):
    messages = [{"role": "user", "content": "a"}]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cases = [
        ({"type": "json_object"}, '{"type": "object"}'),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}, json.dumps(schema)),
        ({"type": "json_schema", "json_schema": {"name": "any"}}, "{}"),
    ]
    for fmt, grammar in cases:
        tm = FakeTokenizerManager(tokenizer)
        chat(tm, messages=messages, response_format=fmt)
        assert tm.requests[0].sampling_params["json_schema"] == grammar, fmt
    tm = FakeTokenizerManager(tokenizer)
    chat(tm, messages=messages, response_format={"type": "text"})
    assert "json_schema" not in tm.requests[0].sampling_params


def test_chat_logprobs(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["Hi", "é"], logprobs=True)])
    out = chat(tm, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2)
    obj = tm.requests[0]
    assert obj.return_logprob and obj.top_logprobs_num == 2 and obj.logprob_start_len is None
    content = out["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "top0", "logprob": -0.1, "bytes": list(b"top0")},
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        ],
    }
    assert content[1]["token"] == "é" and content[1]["bytes"] == [0xC3, 0xA9]


def test_chat_stream(tokenizer):
    tm = FakeTokenizerManager(
        tokenizer,
        [
            engine_results(["Hel", "lo"], prompt_tokens=9),
            engine_results(["A", "B", "C"], prompt_tokens=9, finish={"type": "stop", "matched": 2}),
        ],
    )
    events = stream_events(
        tm,
        chat_completions,
        ChatCompletionRequest,
        messages=[{"role": "user", "content": "x"}],
        n=2,
        stream_options={"include_usage": True},
    )
    *chunks, usage_chunk, done = events
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    for index, text, reason in [(0, "Hello", "length"), (1, "ABC", "stop")]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [reason]
        assert mine[-1]["delta"] == {}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 5,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_chat_stream_logprobs_follow_the_deltas(tokenizer):
    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "b"], logprobs=True)])
    events = stream_events(
        tm, chat_completions, ChatCompletionRequest, messages=[{"role": "user", "content": "x"}], logprobs=True
    )
    content_chunks = [e["choices"][0] for e in events[:-1] if e["choices"][0]["delta"].get("content")]
    assert [[t["token"] for t in c["logprobs"]["content"]] for c in content_chunks] == [["a"], ["b"]]
    assert all(t["top_logprobs"] == [] for c in content_chunks for t in c["logprobs"]["content"])


# ---- against the OpenAI client's own types ---------------------------------------------------


def test_responses_parse_as_openai_client_types(tokenizer):
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion
    from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

    tm = FakeTokenizerManager(tokenizer, [engine_results(["a", "b"], logprobs=True)])
    openai_types.Completion.model_validate(complete(tm, prompt="x", logprobs=2), strict=True)
    ChatCompletion.model_validate(
        chat(tm, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=1), strict=True
    )
    events = stream_events(
        tm,
        chat_completions,
        ChatCompletionRequest,
        messages=[{"role": "user", "content": "x"}],
        stream_options={"include_usage": True},
    )
    for e in events[:-1]:
        OpenAIChatCompletionChunk.model_validate(e, strict=True)
    # The client types a completion chunk as a Completion, whose finish_reason is never null
    # (it does not validate the chunks it reads); the finishing chunk must parse.
    last = stream_events(tm, completions, CompletionRequest, prompt="x", logprobs=1)[-2]
    openai_types.Completion.model_validate(last, strict=True)
    openai_types.Model.model_validate(models_list(tm)["data"][0], strict=True)
