"""The OpenAI-compatible API, driven by the official `openai` client against a real server on
the embedded default model (its chat template is real)."""

import json

import openai
import pytest
from conftest import ServerProcess

pytestmark = pytest.mark.slow  # a server process


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(["--dtype", "float32", "--max-total-tokens", "8192", "--served-model-name", "smollm2"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    from sglang.srt.model_loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    assert client.models.retrieve("default").id == "smollm2"  # SGLang's examples use "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_chat_completion_and_usage(client, tokenizer):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert (
        r.usage.completion_tokens == len(tokenizer.encode(choice.message.content, add_special_tokens=False)) + 1
    )  # + <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_one_finish_chunk_per_choice_and_usage(client):
    plain = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishes) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_n_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, n=3, temperature=1.0, max_completion_tokens=5, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in r.choices)
    assert r.usage.completion_tokens <= 15


def test_completions_prompt_forms_echo_and_logprobs(client, tokenizer):
    r = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    assert r.choices[0].text.startswith(" Paris")
    assert len(r.choices[0].logprobs.tokens) == 4 and all(len(t) >= 2 for t in r.choices[0].logprobs.top_logprobs)
    batch = client.completions.create(model="smollm2", prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0)
    assert len(batch.choices) == 2
    ids = tokenizer.encode("The capital of France is")
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    echo = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The capital of France is" + r.choices[0].text


def test_bad_requests(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=3)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="smollm2", messages=QUESTION, n=1000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="smollm2", prompt="hi " * 9000, max_tokens=1)
    assert client.completions.create(model="smollm2", prompt="ok", max_tokens=1).choices


def test_chat_response_format_constrains_the_reply(client):
    # a schema whose every valid reply is short, so even random weights end it
    schema = {"type": "string", "enum": ["yes", "no"]}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Is it?"}],
            max_tokens=16,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and json.loads(choice.message.content) in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}},
        )
