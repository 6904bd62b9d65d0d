"""The frontend language without a server: chat-template role text, the interpreter's
threads (fork concurrency, errors, streaming), the tracer. Milliseconds each."""

import threading
import time

import pytest
import sglang as sgl
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import JinjaChatTemplate
from sglang.lang.choices import ChoicesDecision
from sglang.lang.tracer import constant_prefix

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ALTERNATING_TEMPLATE = (  # Mistral-like: no system role, strict user/assistant alternation
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _conversation(template, messages):
    """The text a program writes for `messages`, role by role, ending with an open assistant turn."""
    text, history = "", []
    for m in messages:
        prefix, suffix = template.get_prefix_and_suffix(m["role"], history)
        text += prefix + m["content"] + suffix
        history.append(m)
    prefix, _ = template.get_prefix_and_suffix("assistant", history)
    return text + prefix


@pytest.mark.parametrize("source", [SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE])
@pytest.mark.parametrize("with_system", [True, False])
def test_role_text_matches_the_whole_template(source, with_system):
    template = JinjaChatTemplate(source)
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    expected = template.render(messages, add_generation_prompt=True)
    assert _conversation(template, messages) == expected
    assert template.stop_str == (("<|im_end|>",) if source == SMOLLM2_TEMPLATE else ("<|eot_id|>",))


def test_template_without_system_role_says_so():
    template = JinjaChatTemplate(ALTERNATING_TEMPLATE)
    assert template.get_prefix_and_suffix("user", []) == ("[INST] ", " [/INST]")
    assert template.get_prefix_and_suffix("assistant", [{"role": "user", "content": "x"}]) == ("", "")
    with pytest.raises(ValueError, match="cannot write a 'system' message: roles must alternate"):
        template.get_prefix_and_suffix("system", [])


class FakeBackend(BaseBackend):
    """Generates `<n>` for the n-th call; can hold calls until `hold` of them run at once."""

    def __init__(self, hold=0, fail_on=None):
        self.calls = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(hold) if hold else None
        self.fail_on = fail_on
        self.prefixes = []

    def generate(self, s, sampling_params):
        with self.lock:
            self.calls.append((s.text_, sampling_params))
            n = len(self.calls)
        if self.barrier is not None:
            self.barrier.wait(timeout=5)  # BrokenBarrierError unless `hold` calls overlap
        if self.fail_on is not None and self.fail_on in s.text_:
            raise RuntimeError(f"server said no to {self.fail_on!r}")
        return f"<{n}>", {"n": n}

    def generate_stream(self, s, sampling_params):
        for piece in ("a", "b", "c"):
            time.sleep(0.01)
            yield piece, {}

    def select(self, s, choices, temperature, choices_method):
        return ChoicesDecision(choices[-1], {"choices": choices})

    def cache_prefix(self, prefix):
        self.prefixes.append(prefix)


def test_program_text_variables_and_params():
    @sgl.function
    def prog(s, topic):
        s += "About " + topic + ":"
        s += sgl.gen("x", max_tokens=7, stop="\n", temperature=0.5)
        s += " then " + sgl.select("y", choices=["A", "B"])

    backend = FakeBackend()
    state = prog.run(topic="cats", backend=backend, max_new_tokens=3, temperature=0)
    assert state.text() == "About cats:<1> then B"
    assert state["x"] == "<1>" and state["y"] == "B" and "x" in state
    assert state.get_meta_info("x") == {"n": 1} and state.get_meta_info("y") == {"choices": ["A", "B"]}
    params = backend.calls[0][1]
    assert (params.max_new_tokens, params.temperature, params.stop) == (7, 0.5, ["\n"])
    sent = params.to_srt_kwargs()
    assert sent["regex"] is None and sent["top_k"] == -1 and sent["stop"] == ["\n"]


def test_fork_branches_run_concurrently_and_join():
    @sgl.function
    def prog(s):
        s += "Q:"
        forks = s.fork(3)
        forks += lambda i: f" branch {i}:"
        forks += sgl.gen("a", max_tokens=4)
        answers = [f["a"] for f in forks]  # the three generate calls must overlap (barrier of 3)
        forks.join()
        s += " done"
        return answers

    backend = FakeBackend(hold=3)
    state = prog.run(backend=backend)
    assert sorted(state.ret_value) == ["<1>", "<2>", "<3>"]
    assert state["a"] == state.ret_value  # join gathers each branch's variable into a list
    assert sorted(text for text, _ in backend.calls) == ["Q: branch 0:", "Q: branch 1:", "Q: branch 2:"]
    assert backend.prefixes == ["Q:"]  # the shared prefix is prefilled once before branching
    assert state.text() == "Q: done"


def test_error_in_gen_raises_from_run_and_from_reads():
    @sgl.function
    def prog(s):
        s += "bad"
        s += sgl.gen("x")
        s += sgl.gen("y")

    with pytest.raises(RuntimeError, match="server said no"):
        prog.run(backend=FakeBackend(fail_on="bad"))
    states = prog.run_batch([{}, {}], backend=FakeBackend(fail_on="bad"))
    for state in states:
        assert isinstance(state.error(), RuntimeError)
        with pytest.raises(RuntimeError, match="server said no"):
            state["y"]


def test_stream_text_iter_yields_pieces():
    @sgl.function
    def prog(s):
        s += "Start."
        s += sgl.gen("x")

    state = prog.run(backend=FakeBackend(), stream=True)
    assert list(state.text_iter("x")) == ["a", "b", "c"]
    assert "".join(state.text_iter()) == "Start.abc" == state.text()


def test_reading_a_streamed_program_waits_for_it():
    @sgl.function
    def slow(s):
        time.sleep(0.2)  # run() has returned long before this gen is even submitted
        s += sgl.gen("x")
        s += sgl.gen("x")  # the same name twice: the later value wins

    state = slow.run(backend=FakeBackend(), stream=True)
    assert state["x"] == "abc"
    assert state.text() == "abcabc"
    with pytest.raises(KeyError):
        state["never"]


def test_constant_prefix_stops_at_arguments_and_gen():
    @sgl.function
    def prog(s, question):
        s += sgl.system("You are terse.")
        s += sgl.user("Q: " + question)
        s += sgl.assistant(sgl.gen("a"))

    @sgl.function
    def fstring(s, question):
        s += "Intro. "
        s += f"Q: {question}"

    backend = FakeBackend()
    assert constant_prefix(prog, backend) == "SYSTEM:You are terse.\nUSER:Q: "
    assert constant_prefix(fstring, backend) == "Intro. "
    assert backend.calls == []


def test_role_misuse_is_an_error():
    @sgl.function
    def nested(s):
        s += sgl.user_begin()
        s += sgl.assistant_begin()

    with pytest.raises(ValueError, match="roles do not nest"):
        nested.run(backend=FakeBackend())
    with pytest.raises(TypeError, match="first parameter must be 's'"):
        sgl.function(lambda x: None)
    with pytest.raises(ValueError, match="no backend"):
        sgl.set_default_backend(None)
        nested.run()


@pytest.fixture
def stub_server():
    """A local HTTP server that records requests and answers what the test scripted."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization"), None))
            self._answer(200, {"model_path": "stub-model", "chat_template": None})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            if body.get("stream"):
                events = [
                    {"text": "Hel", "meta_info": {}},
                    {"text": "Hello", "meta_info": {}},
                    {"error": {"message": "scheduler died"}},
                ]
                sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
                self._answer(200, sse, "text/event-stream")
            else:
                self._answer(400, {"error": {"message": "temperature must be >= 0, got -1", "code": 400}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_endpoint_sends_key_and_reports_server_messages(stub_server):
    url, seen = stub_server
    endpoint = sgl.RuntimeEndpoint(url, api_key="sekret")
    assert seen[0] == ("/get_model_info", "Bearer sekret", None)
    assert endpoint.get_chat_template().name == "default"  # the server reported none

    @sgl.function
    def prog(s):
        s += "Hi"
        s += sgl.gen("x", max_tokens=5, temperature=-1)

    with pytest.raises(sgl.ServerError) as info:
        prog.run(backend=endpoint)
    assert str(info.value) == f"{url}/generate answered 400: temperature must be >= 0, got -1"
    body = seen[-1][2]
    assert body["text"] == "Hi" and body["sampling_params"]["max_new_tokens"] == 5 and "return_logprob" not in body

    state = prog.run(backend=endpoint, stream=True)
    pieces = []
    with pytest.raises(sgl.ServerError, match="generate failed: scheduler died"):
        for piece in state.text_iter("x"):
            pieces.append(piece)
    assert "".join(pieces) == "Hello" and seen[-1][2]["stream"] is True
