"""Frontend programs whose answers must be right: the embedded default model (SmolLM2-135M-Instruct)."""

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
