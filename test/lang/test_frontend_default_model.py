"""Frontend programs whose answers must be right: the embedded default model (SmolLM2-135M-Instruct)."""

import json

import jsonschema
import pytest
import requests
import sglang as sgl
from conftest import ServerProcess

pytestmark = pytest.mark.slow  # a server process on the default model


@pytest.fixture(scope="module")
def backend():
    server = ServerProcess([])
    try:
        yield sgl.RuntimeEndpoint(server.url)
    finally:
        server.stop()


@pytest.mark.parametrize("word", ["banana", "cherry", "apple"])
def test_select_answer_forced_by_the_prompt(backend, word):
    @sgl.function
    def repeat(s, word):
        s += f"Repeat the word.\nWord: {word}\nWord: {word}\nWord: {word}\nWord:"
        s += sgl.select("word", choices=[" apple", " banana", " cherry"])

    state = repeat.run(word=word, backend=backend)
    assert state["word"] == " " + word
    scores = state.get_meta_info("word")["normalized_prompt_logprobs"]
    assert max(scores) == scores[[" apple", " banana", " cherry"].index(" " + word)]


def test_chat_program_answers_like_the_chat_api(backend):
    @sgl.function
    def qa(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))

    state = qa.run(question="What is the capital of France?", backend=backend)
    r = requests.post(
        backend.base_url + "/v1/chat/completions",
        timeout=120,
        json={
            "model": "default",
            "max_tokens": 12,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
        },
    )
    assert state["answer"] == r.json()["choices"][0]["message"]["content"]
    assert "Paris" in state["answer"]


def test_structured_gens_give_values_that_parse(backend):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["name", "legs"],
        "additionalProperties": False,
    }

    @sgl.function
    def animal(s):
        s += 'Q: What is the capital of France? Answer with a quoted string.\nA: "Paris"\n'
        s += "Q: What is the capital of Italy? Answer with a quoted string.\nA: "
        s += sgl.gen_string("city", max_tokens=16, temperature=0) + "\n"
        s += "Q: How many legs does a spider have?\nA: " + sgl.gen_int("legs", max_tokens=6, temperature=0) + "\n"
        s += "A spider, as JSON with its name and number of legs: "
        s += sgl.gen("json", json_schema=schema, max_tokens=48, temperature=0)  # a dict: sent as a string

    state = animal.run(backend=backend)
    assert isinstance(json.loads(state["city"]), str)  # a JSON string literal, quotes included
    assert int(state["legs"]) >= 0
    jsonschema.validate(json.loads(state["json"]), schema)
