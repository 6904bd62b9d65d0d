"""The real SGLang frontend (`sglang==0.5.5` from PyPI) against OUR server.

Runs inside its own venv, because the real package is also named `sglang`; run_real_frontend.sh
builds that venv (real_frontend_venv.py), starts our server and runs this script:

    /tmp/real-sglang-0.5.5/bin/python -I benchmark/compat/real_frontend.py --url http://127.0.0.1:30917

(`-I` keeps a PYTHONPATH that points at our own `sglang` out of it.)

Each check runs a real-SGLang program through `sgl.RuntimeEndpoint` and compares what it got
with what the server itself answers to plain /generate requests (greedy, so both must agree),
prints one `PASS name` or `FAIL name: why` line, and the script exits 1 if any check failed.
`select` decisions are recomputed here from the server's logprobs of whole prompts
(`logprob_start_len: 0`), with each choices method's definition as the real frontend applies it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import time
import traceback

import requests
import sglang as sgl
from sglang.lang.ir import REGEX_INT, REGEX_STR, SglGen

GREEDY = {"temperature": 0}
CHECK_TIMEOUT_S = 120  # the real frontend's HTTP calls have no timeout of their own
SCORE_TOL = 1e-3  # batched vs single-request logprobs on CPU
REQUIRE_COMPLETE = True  # --allow-cut: structured output cut at max_tokens passes (random models)


class Server:
    """Plain /generate requests, to compute what the frontend should have got."""

    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(self, body: dict) -> dict:
        r = requests.post(self.url + "/generate", json=body, headers=self.headers, timeout=120)
        assert r.status_code == 200, f"/generate answered {r.status_code}: {r.text[:300]}"
        return r.json()

    def continuation(self, text: str, max_new_tokens: int, stop=()) -> str:
        params = {**GREEDY, "max_new_tokens": max_new_tokens, "stop": list(stop)}
        return self.generate({"text": text, "sampling_params": params})["text"]

    def prompt_tokens(self, text: str) -> int:
        return self.generate({"text": text, "sampling_params": {"max_new_tokens": 0}})["meta_info"]["prompt_tokens"]

    def input_logprobs(self, text: str | None = None, input_ids: list[int] | None = None) -> list:
        body = {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0}
        body.update({"text": text} if input_ids is None else {"input_ids": input_ids})
        body["return_text_in_logprobs"] = True
        return self.generate(body)["meta_info"]["input_token_logprobs"]


def run(prog, **kwargs):
    """prog.run(), raising the error the frontend's executor thread hit (it only warns, and the
    program's variables are then missing)."""
    state = prog.run(**kwargs)
    state.sync()
    if state.error() is not None:
        raise state.error()
    return state


# ---------------------------------------------------------------------------------------------
# select: what each choices method should decide, from the server's own logprobs
# ---------------------------------------------------------------------------------------------


def choice_windows(server: Server, text: str, choices: list[str]) -> list[list]:
    """Per choice, the logprob entries the real frontend scores: from token P-2 of `text + choice`
    (P = the token count of `text` alone) to the end, less the first one when its text ends
    `text` (its "no token healing" rule). Taken from a whole-prompt request, so every entry
    has the logprob of its token given all the tokens before it."""
    start = max(server.prompt_tokens(text) - 2, 0)
    windows = []
    for choice in choices:
        entries = server.input_logprobs(text + choice)[start:]
        windows.append(entries[1:] if text.endswith(entries[0][2]) else entries)
    return windows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _best(scores: list[float]) -> list[int]:
    """The indices of the best score, and of any within SCORE_TOL of it (a near tie, which the
    frontend's own batched logprobs may break either way)."""
    top = max(scores)
    return [i for i, x in enumerate(scores) if x >= top - SCORE_TOL]


# Each returns (the acceptable decisions, the meta_info key the frontend reports its scores
# under, the scores it should report).


def expected_token_length_normalized(server, text, choices):
    scores = [_mean([e[0] for e in w]) for w in choice_windows(server, text, choices)]
    return _best(scores), "normalized_prompt_logprobs", scores


def expected_greedy_token_selection(server, text, choices):
    """Token by token, keep the choices with the highest logprob; a shorter choice is padded
    with its own mean."""
    rows = [[e[0] for e in w] for w in choice_windows(server, text, choices)]
    width = max(map(len, rows))
    rows = [row + [_mean(row)] * (width - len(row)) for row in rows]
    alive = list(range(len(choices)))
    for pos in range(width):
        alive = [alive[i] for i in _best([rows[a][pos] for a in alive])]
        if len(alive) == 1:
            break
    return alive, "greedy_logprob_matrix", rows


def expected_unconditional_likelihood_normalized(server, text, choices):
    """Mean over the window of logprob(token | text) - logprob(token | the window's earlier
    tokens only); the window's first token has no context alone and counts 0."""
    scores = []
    for w in choice_windows(server, text, choices):
        alone = server.input_logprobs(input_ids=[e[1] for e in w])
        assert len(alone) == len(w), f"{len(alone)} unconditional logprobs for {len(w)} tokens"
        uncond = [0.0] + [e[0] for e in alone[1:]]
        scores.append(_mean([c[0] - u for c, u in zip(w, uncond)]))
    return _best(scores), "normalized_unconditional_prompt_logprobs", scores


METHODS = {
    "token_length_normalized": (sgl.token_length_normalized, expected_token_length_normalized),
    "greedy_token_selection": (sgl.greedy_token_selection, expected_greedy_token_selection),
    "unconditional_likelihood_normalized": (
        sgl.unconditional_likelihood_normalized,
        expected_unconditional_likelihood_normalized,
    ),
}
SELECT_PROMPT = "Q: Which animal says moo?\nA: The answer is"
SELECT_CHOICES = [" a cow", " a cow mooing", " the cat"]  # " a cow" is a prefix of another choice


def _close(got, want) -> bool:
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_close, got, want))
    return math.isclose(got, want, abs_tol=SCORE_TOL)


def check_select(server: Server, method_name: str) -> str:
    method, expected = METHODS[method_name]

    @sgl.function
    def prog(s):
        s += SELECT_PROMPT
        s += sgl.select("animal", choices=SELECT_CHOICES, choices_method=method)

    state = run(prog)
    best, key, scores = expected(server, SELECT_PROMPT, SELECT_CHOICES)
    got = state["animal"]
    want = [SELECT_CHOICES[i] for i in best]
    assert got in want, f"chose {got!r}; the server's logprobs give {' or '.join(map(repr, want))}"
    reported = state.get_meta_info("animal")[key]
    assert _close(reported, scores), f"{key}: the frontend has {reported}, the server's logprobs give {scores}"
    return f"{got!r}{' (a near tie)' if len(want) > 1 else ''}"


# ---------------------------------------------------------------------------------------------
# The other checks
# ---------------------------------------------------------------------------------------------


def _constrained(server: Server, prompt: str, gen: SglGen, constraint: dict, max_tokens: int) -> tuple[str, bool]:
    """Runs `prompt + gen` through the frontend, and the same constrained request straight to
    the server; both must give the same text. Returns it, and whether the grammar completed
    (False: cut at max_tokens, as a random model's output is)."""

    @sgl.function
    def prog(s):
        s += prompt
        s += gen

    text = run(prog)["v"]
    params = {**GREEDY, "max_new_tokens": max_tokens, **constraint}
    direct = server.generate({"text": prompt, "sampling_params": params})
    assert text == direct["text"], (
        f"the frontend got {text!r}, the same request straight to the server {direct['text']!r}"
    )
    complete = direct["meta_info"]["finish_reason"]["type"] != "length"
    if REQUIRE_COMPLETE and not complete:
        raise AssertionError(f"{text!r} was cut at max_tokens={max_tokens} before the grammar completed")
    return text, complete


def check_regex(server: Server) -> str:
    pattern = r"(19|20)[0-9]{2}"  # complete in 4 tokens at most, whatever the model
    year, _ = _constrained(
        server,
        "The first moon landing was in the year ",
        sgl.gen("v", regex=pattern, max_tokens=8, **GREEDY),
        {"regex": pattern},
        8,
    )
    assert re.fullmatch(pattern, year), f"{year!r} does not match {pattern}"
    return repr(year)


def check_json_schema(server: Server) -> str:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
        "required": ["name", "legs"],
        "additionalProperties": False,
    }
    text, complete = _constrained(
        server,
        "A spider, as JSON with its name and number of legs: ",
        sgl.gen("v", json_schema=json.dumps(schema), max_tokens=48, **GREEDY),  # 0.5.5 takes a string
        {"json_schema": json.dumps(schema)},
        48,
    )
    if not complete:
        assert text.startswith("{"), text
        return f"{text[:40]!r}... (cut at max_tokens)"
    obj = json.loads(text)
    assert set(obj) == {"name", "legs"} and isinstance(obj["legs"], int) and isinstance(obj["name"], str), obj
    return text


def check_gen_int(server: Server) -> str:
    n, _ = _constrained(
        server,
        "Q: How many legs does a spider have?\nA: ",
        sgl.gen_int("v", max_tokens=8, **GREEDY),
        {"regex": REGEX_INT, "stop": [" ", "\n"]},
        8,
    )
    assert re.fullmatch(REGEX_INT, n), f"{n!r} does not match gen_int's regex {REGEX_INT}"
    int(n)  # what the regex allows (trailing whitespace too) parses
    return repr(n)


def check_gen_string(server: Server) -> str:
    city, complete = _constrained(
        server,
        'Q: What is the capital of France? Answer with a quoted string.\nA: "Paris"\n'
        "Q: What is the capital of Italy? Answer with a quoted string.\nA: ",
        sgl.gen_string("v", max_tokens=16, **GREEDY),
        {"regex": REGEX_STR},
        16,
    )
    if not complete:
        assert re.fullmatch(r"\"[\w\d\s]*", city), f"{city!r} is not the start of a quoted string"
        return f"{city[:40]!r}... (cut at max_tokens)"
    assert re.fullmatch(REGEX_STR, city), f"{city!r} does not match gen_string's regex {REGEX_STR}"
    assert isinstance(json.loads(city), str)
    return repr(city)


def check_chat_roles(server: Server) -> str:
    @sgl.function
    def chat(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=8, **GREEDY))

    state = run(chat, question="What is the capital of France?")
    template = sgl.global_config.default_backend.get_chat_template()
    prompt = template.get_prefix_and_suffix("system", [])[0]
    prompt += "You are a helpful assistant." + template.get_prefix_and_suffix("system", [])[1]
    user_prefix, user_suffix = template.get_prefix_and_suffix("user", [])
    prompt += user_prefix + "What is the capital of France?" + user_suffix
    prompt += template.get_prefix_and_suffix("assistant", [])[0]
    answer = server.continuation(prompt, 8, stop=template.stop_str)
    assert state["answer"] == answer, f"{state['answer']!r} != the server's {answer!r} ({template.name} template)"
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant"], roles
    return f"{template.name} template, answer {answer!r}"


def check_fork(server: Server) -> str:
    @sgl.function
    def prog(s):
        s += "Two colours:"
        forks = s.fork(2)
        for i, word in enumerate([" red", " blue"]):
            forks[i] += word + " is" + sgl.gen("more", max_tokens=6, **GREEDY)
        forks.join()  # gathers each branch's "more" into a list
        s += " done"

    state = run(prog)
    got = state["more"]
    want = [server.continuation("Two colours:" + w + " is", 6) for w in (" red", " blue")]
    assert got == want, f"{got!r} != {want!r}"
    assert state.text() == "Two colours: done", state.text()
    return repr(got)


def check_stream(server: Server) -> str:
    @sgl.function
    def prog(s):
        s += "Once upon a time"
        s += sgl.gen("story", max_tokens=32, **GREEDY)

    state = prog.run(stream=True)
    pieces = list(state.text_iter("story"))
    want = server.continuation("Once upon a time", 32)
    assert "".join(pieces) == state["story"] == want, f"{''.join(pieces)!r} != {want!r}"
    return f"{len(pieces)} pieces"


def check_run_batch(server: Server) -> str:
    @sgl.function
    def qa(s, question):
        s += "You answer questions about the solar system, briefly and correctly, in one line.\n"
        s += "Q: " + question + "\nA:"
        s += sgl.gen("a", max_tokens=6, **GREEDY)

    questions = ["Which planet is largest?", "What is the Sun?", "How many moons has Mars?"]
    states = qa.run_batch([{"question": q} for q in questions], num_threads=3)
    prefix = "You answer questions about the solar system, briefly and correctly, in one line.\n"
    for q, state in zip(questions, states):
        if state.error() is not None:
            raise state.error()
        want = server.continuation(prefix + "Q: " + q + "\nA:", 6)
        assert state["a"] == want, f"{q}: {state['a']!r} != {want!r}"
    return f"{len(states)} programs"


def check_server_info(server: Server) -> str:
    info = sgl.get_server_info()
    assert isinstance(info, dict) and info, info
    sgl.flush_cache()
    return f"{len(info)} keys"


CHECKS = {
    "server_info_and_flush_cache": check_server_info,
    "gen_regex": check_regex,
    "gen_json_schema": check_json_schema,
    "gen_int": check_gen_int,
    "gen_string": check_gen_string,
    **{f"select[{name}]": (lambda server, name=name: check_select(server, name)) for name in METHODS},
    "chat_roles": check_chat_roles,
    "fork": check_fork,
    "stream": check_stream,
    "run_batch": check_run_batch,
}


def _on_alarm(signum, frame):
    raise TimeoutError(f"no result within {CHECK_TIMEOUT_S} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="our server, e.g. http://127.0.0.1:30000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument(
        "--allow-cut",
        action="store_true",
        help="structured output cut at max_tokens before its grammar completed still passes (for a random-weight "
        "model, which never closes a string); it must still be what the server answers to the same request",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of a failure")
    args = parser.parse_args()
    global REQUIRE_COMPLETE
    REQUIRE_COMPLETE = not args.allow_cut

    print(f"real SGLang frontend {sgl.__version__} ({sgl.__file__}) against {args.url}", flush=True)
    server = Server(args.url, args.api_key)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url, api_key=args.api_key))
    names = args.only.split(",") if args.only else list(CHECKS)
    signal.signal(signal.SIGALRM, _on_alarm)
    failed = []
    for name in names:
        started = time.monotonic()
        signal.alarm(CHECK_TIMEOUT_S)
        try:
            detail = CHECKS[name](server)
            print(f"PASS {name} ({time.monotonic() - started:.1f} s): {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            failed.append(name)
            print(f"FAIL {name} ({time.monotonic() - started:.1f} s): {type(e).__name__}: {e}", flush=True)
            if args.verbose:
                traceback.print_exc()
        finally:
            signal.alarm(0)
    print(f"{len(names) - len(failed)}/{len(names)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
