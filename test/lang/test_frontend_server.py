"""Frontend programs against a real server on a tiny random Llama (float32), started by
sgl.Runtime, which this module also tests (launch, endpoint, shutdown)."""

import re
import socket
import threading
import time

import pytest
import requests
import sglang as sgl
from sglang.lang.http_client import ServerError

pytestmark = pytest.mark.slow  # a server process

GREEDY = {"temperature": 0, "ignore_eos": True}
API_KEY = "sk-frontend-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def runtime(make_tiny_model):
    model = make_tiny_model("llama", seed=3)
    rt = sgl.Runtime(
        model_path=str(model), dtype="float32", max_total_tokens=4096, port=31000, log_level="warning", api_key=API_KEY
    )
    sgl.set_default_backend(rt)
    yield rt
    sgl.set_default_backend(None)
    pid = rt.pid
    rt.shutdown()
    with pytest.raises(ServerError, match="cannot reach"):  # the server is gone after shutdown
        sgl.RuntimeEndpoint(rt.url, timeout=5)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def _generate(rt, text, **params):
    r = requests.post(
        rt.url + "/generate", json={"text": text, "sampling_params": {**GREEDY, **params}}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_runtime_endpoint_and_server_info(runtime, make_tiny_model):
    assert runtime.endpoint.get_model_name() == str(make_tiny_model("llama", seed=3))
    info = sgl.get_server_info()
    assert info["max_total_num_tokens"] == 4096 and info["dtype"] == "float32"
    assert sgl.flush_cache() is True


def test_gen_is_the_servers_continuation(runtime):
    @sgl.function
    def prog(s, subject):
        s += "Facts about " + subject + ":"
        s += sgl.gen("facts", max_tokens=6, ignore_eos=True, temperature=0, return_logprob=True, top_logprobs_num=2)
        s += "\nMore:" + sgl.gen("more", max_tokens=3)

    state = prog.run(subject="owls", temperature=0, ignore_eos=True)
    direct = _generate(runtime, "Facts about owls:", max_new_tokens=6)
    assert state["facts"] == direct["text"]
    meta = state.get_meta_info("facts")
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] == direct["meta_info"]["prompt_tokens"]
    assert [e[1] for e in meta["output_token_logprobs"]] == direct["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    more = _generate(runtime, "Facts about owls:" + direct["text"] + "\nMore:", max_new_tokens=3)["text"]
    assert state["more"] == more  # run()'s defaults apply to gens that do not set them
    assert state.text() == "Facts about owls:" + direct["text"] + "\nMore:" + more


def test_gen_stop_and_min_tokens(runtime):
    full = _generate(runtime, "Once upon a time", max_new_tokens=12)["text"]
    stop = full[len(full) // 2 :][:3]
    assert stop.strip() and stop in full

    @sgl.function
    def prog(s):
        s += "Once upon a time"
        s += sgl.gen("x", max_tokens=12, stop=[stop], temperature=0)

    assert prog.run()["x"] == full[: full.index(stop)]


def test_structured_output_follows_the_grammar_and_bad_grammars_fail_clearly(runtime):
    @sgl.function
    def prog(s, kind):
        s += "A number:"
        if kind == "regex":
            s += sgl.gen("n", regex=r"[0-9]+", max_tokens=8)
        elif kind == "json":
            s += sgl.gen("n", json_schema={"type": "object"}, max_tokens=8)
        elif kind == "bad_json":
            s += sgl.gen("n", json_schema="{", max_tokens=8)
        else:
            s += sgl.gen_int("n", max_tokens=8)

    assert re.fullmatch(r"[0-9]+", prog.run(kind="regex")["n"])
    assert re.fullmatch(r"[-+]?[0-9]+", prog.run(kind="int")["n"])
    assert prog.run(kind="json")["n"].startswith("{")  # a random model may not close it in 8 tokens
    with pytest.raises(ServerError) as info:
        prog.run(kind="bad_json")
    err = info.value
    assert err.status == 400 and err.url == runtime.url + "/generate"
    assert "json_schema is not valid JSON" in err.message and runtime.url in str(err)


def _input_logprobs(rt, **prompt):
    """The server's logprob entries of every prompt token (`text=` or `input_ids=`), from scratch."""
    r = requests.post(
        rt.url + "/generate",
        json={**prompt, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]["input_token_logprobs"]


def _choice_entries(rt, prompt, choice):
    """The logprob entries of the tokens `prompt + choice` has beyond `prompt`'s own."""
    base, full = [e[1] for e in _input_logprobs(rt, text=prompt)], _input_logprobs(rt, text=prompt + choice)
    start = next(i for i, (a, b) in enumerate(zip(base + [None], full)) if a != b[1])
    return full[start:]


def _mean(values):
    return sum(values) / len(values)


def _choice_score(rt, prompt, choice):
    """Mean logprob of the choice's tokens (token_length_normalized)."""
    return _mean([e[0] for e in _choice_entries(rt, prompt, choice)])


def test_select_picks_the_best_scored_choice(runtime):
    choices = [" red", " green apples", " blue"]

    @sgl.function
    def prog(s):
        s += "My favourite colour is"
        s += sgl.select("colour", choices=choices)
        s += "." + sgl.gen("same", choices=choices)

    state = prog.run()
    scores = [_choice_score(runtime, "My favourite colour is", c) for c in choices]
    meta = state.get_meta_info("colour")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(scores, abs=1e-3)
    assert state["colour"] == choices[scores.index(max(scores))]
    assert state["same"] in choices and state.text() == "My favourite colour is" + state["colour"] + "." + state["same"]


COLOURS = [" red", " red apples", " blue"]  # " red" is a prefix of another choice


def _select(method):
    @sgl.function
    def prog(s):
        s += "My favourite colour is"
        s += sgl.select("colour", choices=COLOURS, choices_method=method)

    state = prog.run()
    return state["colour"], state.get_meta_info("colour")


def test_select_greedy_token_selection_compares_token_by_token(runtime):
    rows = [[e[0] for e in _choice_entries(runtime, "My favourite colour is", c)] for c in COLOURS]
    width = max(map(len, rows))
    rows = [row + [_mean(row)] * (width - len(row)) for row in rows]  # a shorter choice: padded with its mean
    alive = list(range(len(COLOURS)))
    for pos in range(width):  # keep the choices with the best logprob at each token, until one is left
        top = max(rows[i][pos] for i in alive)
        alive = [i for i in alive if rows[i][pos] > top - 1e-4]  # the same token: the same logprob
        if len(alive) == 1:
            break
    decision, meta = _select(sgl.greedy_token_selection)
    assert len(alive) == 1 and decision == COLOURS[alive[0]]
    assert meta["greedy_logprob_matrix"] == [pytest.approx(row, abs=1e-3) for row in rows]


def test_select_unconditional_likelihood_normalized_subtracts_each_choices_own_likelihood(runtime):
    scores = []
    for c in COLOURS:
        entries = _choice_entries(runtime, "My favourite colour is", c)
        alone = _input_logprobs(runtime, input_ids=[e[1] for e in entries])
        assert len(alone) == len(entries) and alone[0][0] is None  # the first token alone has no context
        scores.append(_mean([e[0] - (u[0] or 0.0) for e, u in zip(entries, alone)]))
    decision, meta = _select(sgl.unconditional_likelihood_normalized)
    assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(scores, abs=1e-3)
    assert decision == COLOURS[scores.index(max(scores))]
    assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-2  # a decision the tolerance above cannot flip


def test_roles_use_the_servers_chat_template(runtime, tokenizer_dir):
    from transformers import AutoTokenizer

    @sgl.function
    def chat(s, question):
        s += sgl.system("You are terse.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=4, ignore_eos=True, temperature=0))
        s += sgl.user_begin() + "Thanks" + sgl.user_end()

    state = chat.run(question="Name a colour.")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    prompt = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    answer = _generate(runtime, prompt, max_new_tokens=4)["text"]
    assert state["answer"] == answer
    assert state.text() == prompt + answer + "<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
    assert state.messages() == messages + [
        {"role": "assistant", "content": answer.lstrip()},
        {"role": "user", "content": "Thanks"},
    ]


def test_fork_branches_continue_independently(runtime):
    @sgl.function
    def prog(s):
        s += "List:"
        forks = s.fork(2)
        forks += lambda i: [" one", " two"][i]
        forks += sgl.gen("item", max_tokens=4, **GREEDY)
        forks.join()

    state = prog.run()
    assert state["item"] == [_generate(runtime, "List:" + w, max_new_tokens=4)["text"] for w in (" one", " two")]
    assert state.text() == "List:"


def test_stream_yields_the_same_text_in_pieces(runtime):
    @sgl.function
    def prog(s):
        s += "Once upon a time"
        s += sgl.gen("story", max_tokens=48, **GREEDY)

    state = prog.run(stream=True)
    pieces = list(state.text_iter("story"))
    # The server streams whatever has accumulated when the client is ready for more (as SGLang
    # does), so a short generation can arrive in one piece when the machine is busy; 48
    # tokens of a tiny model take long enough to arrive in several.
    assert len(pieces) > 1
    assert "".join(pieces) == state["story"] == _generate(runtime, "Once upon a time", max_new_tokens=48)["text"]
    assert state.get_meta_info("story")["completion_tokens"] == 48
    whole = prog.run(stream=True)
    assert "".join(whole.text_iter()) == whole.text() == "Once upon a time" + state["story"]


def test_run_batch_caches_the_shared_prefix_once(runtime):
    @sgl.function
    def qa(s, question):
        s += "You answer questions about the solar system, briefly and correctly, in one line.\n"
        s += "Q: " + question + "\nA:"
        s += sgl.gen("a", max_tokens=3, **GREEDY)

    questions = ["Which planet is largest?", "What is the Sun?", "How many moons has Mars?", "Is Pluto a planet?"]
    assert sgl.flush_cache()
    states = qa.run_batch([{"question": q} for q in questions], num_threads=4, progress_bar=True)
    prefix_tokens = _generate(
        runtime, "You answer questions about the solar system, briefly and correctly, in one line.\n", max_new_tokens=0
    )["meta_info"]["prompt_tokens"]
    for q, state in zip(questions, states):
        assert state.get_meta_info("a")["cached_tokens"] >= prefix_tokens - 1  # every program reused it
        assert state["a"] == qa.run(question=q)["a"]
    assert qa.run_batch([("Is the Moon a planet?",)])[0]["a"] == qa.run("Is the Moon a planet?")["a"]


def test_errors_name_the_url_and_never_hang(runtime):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ServerError, match=f"{dead}/get_model_info failed: cannot reach"):
        sgl.RuntimeEndpoint(dead)

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    started = time.monotonic()
    with pytest.raises(ServerError, match="no answer within 1 s"):
        sgl.RuntimeEndpoint(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1)
    assert time.monotonic() - started < 10
    silent.close()

    @sgl.function
    def too_long(s):
        s += "hi"
        s += sgl.gen("x", max_tokens=-3)

    with pytest.raises(ServerError, match="answered 400: .*max_new_tokens must be >= 0"):
        too_long.run()

    with pytest.raises(ServerError, match="get_model_info answered 401: missing or invalid API key"):
        sgl.RuntimeEndpoint(runtime.url, api_key="wrong")
    done = threading.Event()
    threading.Thread(target=lambda: (too_long.run_batch([{}, {}]), done.set()), daemon=True).start()
    assert done.wait(30), "a failing batch must return"
