"""SGLang's native HTTP API against a real server process (tiny random Llama, float32)."""

import json
import time

import pytest
import requests
from conftest import ServerProcess

pytestmark = pytest.mark.slow  # a server process

GREEDY = {"temperature": 0, "ignore_eos": True}
# A KV cache smaller than the 4096-token context: some prompts fit the one but not the other.
KV_TOKENS = 2048
MAX_REQUEST_BYTES = 1 << 20


@pytest.fixture(scope="module")
def tiny_server(make_tiny_model):
    server = ServerProcess(
        [
            "--model-path",
            str(make_tiny_model("llama", seed=3)),
            "--dtype",
            "float32",
            "--max-total-tokens",
            str(KV_TOKENS),
            "--max-request-bytes",
            str(MAX_REQUEST_BYTES),
        ]
    )
    yield server
    server.stop()


def _post(server, path, **kwargs):
    return requests.post(server.url + path, timeout=60, **kwargs)


def test_generate_single_and_batch(tiny_server):
    r = _post(
        tiny_server, "/generate", json={"text": "Hello world", "sampling_params": {**GREEDY, "max_new_tokens": 5}}
    )
    assert r.status_code == 200
    out = r.json()
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 5 and len(out["output_ids"]) == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert {"id", "prompt_tokens", "cached_tokens", "e2e_latency"} <= set(meta)

    batch = _post(
        tiny_server,
        "/generate",
        json={
            "text": ["Hello world", "Good morning"],
            "sampling_params": [{**GREEDY, "max_new_tokens": 5}, {**GREEDY, "max_new_tokens": 3}],
        },
    ).json()
    assert isinstance(batch, list) and [b["meta_info"]["completion_tokens"] for b in batch] == [5, 3]
    assert batch[0]["output_ids"] == out["output_ids"]  # same greedy result alone or batched

    ids = _post(
        tiny_server,
        "/generate",
        json={"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {**GREEDY, "max_new_tokens": 2}},
    ).json()
    assert [b["meta_info"]["prompt_tokens"] for b in ids] == [3, 2]


def test_stream_is_cumulative_sse_ending_with_done(tiny_server):
    r = _post(
        tiny_server,
        "/generate",
        json={"text": "Once upon", "sampling_params": {**GREEDY, "max_new_tokens": 6}, "stream": True},
        stream=True,
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), "no comments or keep-alives in the stream"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert [c["meta_info"]["completion_tokens"] for c in chunks][-1] == 6
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    plain = _post(
        tiny_server, "/generate", json={"text": "Once upon", "sampling_params": {**GREEDY, "max_new_tokens": 6}}
    ).json()
    assert texts[-1] == plain["text"]


def test_select_style_scoring_requests(tiny_server):
    """What the frontend's select() sends: prefill-only batch requests with input logprobs."""
    p = _post(tiny_server, "/generate", json={"text": "The answer is", "sampling_params": {"max_new_tokens": 0}}).json()
    assert p["text"] == "" and p["meta_info"]["completion_tokens"] == 0
    prompt_tokens = p["meta_info"]["prompt_tokens"]
    start = max(prompt_tokens - 2, 0)
    outs = _post(
        tiny_server,
        "/generate",
        json={
            "text": ["The answer is yes", "The answer is no"],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": start,
        },
    ).json()
    for out, text in zip(outs, ["The answer is yes", "The answer is no"]):
        entries = out["meta_info"]["input_token_logprobs"]
        assert len(entries) == out["meta_info"]["prompt_tokens"] - start
        # every window entry is scored given all the tokens before it, the first one included
        # (SGLang's server sends null there, which its own frontend cannot average)
        assert all(isinstance(e[0], float) for e in entries)
        assert all(isinstance(e[2], str) for e in entries)
        assert out["meta_info"]["output_token_logprobs"] == []
        # a prefill-only request without a window gets the whole prompt's (unconditional_likelihood_normalized)
        whole = _post(
            tiny_server,
            "/generate",
            json={"text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True},
        ).json()["meta_info"]["input_token_logprobs"]
        assert whole[0][0] is None and len(whole) == out["meta_info"]["prompt_tokens"]
        assert [e[1] for e in whole[start:]] == [e[1] for e in entries]
        assert [e[0] for e in whole[start:]] == pytest.approx([e[0] for e in entries], abs=1e-4)


def test_accepts_fields_sglang_clients_send(tiny_server):
    body = {
        "text": "Hi",
        "lora_path": None,
        "return_routed_experts": False,
        "sampling_params": {
            "max_new_tokens": 2,
            "min_new_tokens": 0,
            "n": 1,
            "stop": [],
            "stop_token_ids": [],
            "stop_regex": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "ignore_eos": False,
            "regex": None,
            "json_schema": None,
            "skip_special_tokens": True,
            "spaces_between_special_tokens": True,
        },
    }
    assert _post(tiny_server, "/generate", json=body).status_code == 200


def test_bad_requests_get_400_and_the_server_keeps_serving(tiny_server):
    cases = [
        ({"data": "{not json"}, "JSON"),
        ({"json": {"text": "Hi", "sampling_params": {"temperature": -1}}}, "temperature"),
        ({"json": {"text": "Hi", "sampling_params": {"max_new_tokns": 3}}}, "max_new_tokns"),
        ({"json": {"text": ""}}, "empty"),
        ({"json": {"text": "x " * 5000, "sampling_params": {"max_new_tokens": 1}}}, "context length"),
        ({"json": {"text": "Hi", "stream": "yes"}}, "stream"),
        ({"json": {"text": 5}}, "text"),
        ({"json": {"input_ids": [1, -5]}}, "input_ids"),
        ({"json": {"text": "Hi", "sampling_params": {"regex": "[a-z"}}}, "regex"),
        ({"json": {"text": "Hi", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}}, "regex and ebnf"),
    ]
    for kwargs, word in cases:
        r = _post(tiny_server, "/generate", **kwargs)
        assert r.status_code == 400, (kwargs, r.text)
        assert word in r.json()["error"]["message"], (word, r.text)
    assert (
        _post(tiny_server, "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}).status_code
        == 200
    )


def test_info_endpoints_and_flush(tiny_server):
    assert requests.get(tiny_server.url + "/health").status_code == 200
    assert requests.get(tiny_server.url + "/health_generate").status_code == 200
    for path in ("/get_model_info", "/model_info"):
        assert "model_path" in requests.get(tiny_server.url + path).json()
    for path in ("/get_server_info", "/server_info"):
        info = requests.get(tiny_server.url + path).json()
        assert info["max_total_num_tokens"] == KV_TOKENS and info["port"] == tiny_server.port
    assert requests.get(tiny_server.url + "/v1/models").json()["data"][0]["id"]
    assert _post(tiny_server, "/flush_cache").status_code == 200
    assert requests.get(tiny_server.url + "/server_info").json()["kv_tokens_cached"] == 0


def test_client_disconnect_mid_stream_frees_kv(tiny_server):
    body = {"text": "Tell me a long story", "sampling_params": {**GREEDY, "max_new_tokens": 3000}, "stream": True}
    with requests.post(tiny_server.url + "/generate", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        info = requests.get(tiny_server.url + "/server_info").json()
        assert info["num_running_reqs"] == 1 and info["kv_tokens_used"] > 0
    deadline = time.time() + 10
    while time.time() < deadline:
        info = requests.get(tiny_server.url + "/server_info").json()
        if info["num_running_reqs"] == 0 and info["kv_tokens_used"] == 0:
            break
        time.sleep(0.1)
    assert info["num_running_reqs"] == 0 and info["kv_tokens_used"] == 0


def test_abort_request_endpoint(tiny_server):
    import threading

    result = {}

    def run():
        body = {"text": "Count", "rid": "to-abort", "sampling_params": {**GREEDY, "max_new_tokens": 3000}}
        result["out"] = _post(tiny_server, "/generate", json=body).json()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 10
    while requests.get(tiny_server.url + "/server_info").json()["num_running_reqs"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert _post(tiny_server, "/abort_request", json={"rid": "to-abort"}).status_code == 200
    t.join(timeout=30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"


def test_bodies_that_once_killed_the_scheduler_get_an_answer_and_the_server_keeps_serving(tiny_server):
    """Each of these ended the scheduler process (and so the server) before validation and the
    scheduler's per-request failure handling. Out-of-range values are a 400 naming the field;
    a huge prompt top_logprobs_num is a 400 where the HTTP side bounds it, else clamped to the
    vocabulary; custom_params that look like the codec's markers are plain user data."""
    rejected = [
        ({"text": "hi", "sampling_params": {"repetition_penalty": 1e-300, "max_new_tokens": 4}}, "repetition_penalty"),
        ({"text": "hi", "sampling_params": {"sampling_seed": 2**64 - 1, "max_new_tokens": 1}}, "sampling_seed"),
        ({"text": "hi", "sampling_params": {"top_k": 1e30, "max_new_tokens": 1}}, "top_k"),
    ]
    for body, field in rejected:
        r = _post(tiny_server, "/generate", json=body)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (body, r.text)

    bias = {
        "text": "hi",
        "sampling_params": {"logit_bias": {"1": 1e300, "2": 1e300}, "temperature": 1, "max_new_tokens": 4},
    }
    r = _post(tiny_server, "/generate", json=bias)
    assert r.status_code == 200, r.text  # clamped to +100, as OpenAI does: tokens 1 and 2 win
    assert set(r.json()["output_ids"]) <= {1, 2}

    for custom in ({"__type__": "Nope"}, {"__set__": 1}):
        body = {"text": "hi", "sampling_params": {"custom_params": custom, "max_new_tokens": 2}}
        assert _post(tiny_server, "/generate", json=body).status_code == 200, custom

    top = {"text": "hello world", "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 100000}
    r = _post(tiny_server, "/generate", json={**top, "sampling_params": {"max_new_tokens": 1}})
    if r.status_code == 400:
        assert "top_logprobs_num" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200, r.text
        tops = r.json()["meta_info"]["input_top_logprobs"]
        assert tops[0] is None and 0 < len(tops[1]) <= 49152

    assert requests.get(tiny_server.url + "/health", timeout=10).status_code == 200
    ok = _post(tiny_server, "/generate", json={"text": "Hello", "sampling_params": {**GREEDY, "max_new_tokens": 3}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 3


# ---- request validation, error shapes and request costs --------------------------------------

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def _error(r: requests.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    return error


def test_bad_inputs_are_400s_naming_the_field(tiny_server):
    cases = [
        ("/generate", {"input_ids": 5}, "input_ids"),
        ("/generate", {"input_ids": {"0": 1}}, "input_ids"),
        ("/generate", {"input_ids": [[1], 2]}, "input_ids"),
        ("/generate", {"input_ids": "hello"}, "input_ids"),
        ("/generate", {"text": "hi", "rid": {"a": 1}}, "rid"),
        ("/generate", {"text": ["a", "b"], "rid": ["x", 3]}, "rid"),
        ("/generate", {"text": "hi", "sampling_params": 5}, "sampling_params"),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{}, 2]}, "sampling_params"),
        ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 49151}, "top_logprobs_num"),
        (CHAT, {"messages": MESSAGES, "chat_template_kwargs": {"tools": 5}}, "chat_template_kwargs.tools"),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
    ]
    for path, body, field in cases:
        error = _error(_post(tiny_server, path, json=body))
        assert error["param"] == field and field in error["message"], (body, error)


def test_lone_surrogates_and_malformed_bodies_are_400s_in_the_error_shape(tiny_server):
    json_header = {"Content-Type": "application/json"}
    bodies = {
        "/generate": b'{"text": "\\ud800"}',
        "/v1/completions": b'{"prompt": "\\ud800", "max_tokens": 1}',
        CHAT: b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    }
    for path, body in bodies.items():
        assert "surrogate" in _error(_post(tiny_server, path, data=body, headers=json_header))["message"], path
    for body in (b'{"prompt": "\xff"}', b"[" * 2000 + b"]" * 2000):
        assert "JSON" in _error(_post(tiny_server, "/v1/completions", data=body, headers=json_header))["message"]
    for headers in ({}, {"Content-Type": "text/plain"}):
        r = _post(tiny_server, CHAT, data=json.dumps({"messages": MESSAGES}), headers=headers)
        assert "Content-Type" in _error(r)["message"]


def test_a_prompt_over_the_kv_cache_is_a_400_on_every_route(tiny_server):
    ids = [5] * (KV_TOKENS + 100)  # within the 4096-token context
    for path, body in [
        ("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}),
        ("/v1/completions", {"prompt": ids, "max_tokens": 1}),
        (CHAT, {"messages": [{"role": "user", "content": "x " * (KV_TOKENS + 100)}], "max_tokens": 1}),
    ]:
        error = _error(_post(tiny_server, path, json=body))
        assert "KV cache" in error["message"] and error["param"] in ("input_ids", "text"), (path, error)


def test_duplicate_rid_batch_leaks_nothing(tiny_server):
    error = _error(_post(tiny_server, "/generate", json={"text": ["a", "b"], "rid": ["x", "x"]}))
    assert error["param"] == "rid"
    r = _post(tiny_server, "/generate", json={"text": "a", "rid": "x", "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "x"


def test_body_over_the_limit_is_413(tiny_server):
    big = json.dumps({"text": "x" * MAX_REQUEST_BYTES}).encode()
    error = _error(_post(tiny_server, "/generate", data=big), 413)
    assert "--max-request-bytes" in error["message"]
    chunked = _post(tiny_server, "/v1/completions", data=iter([big[:1000], big[1000:]]))  # no Content-Length
    _error(chunked, 413)


def test_unknown_paths_and_methods_answer_in_the_error_shape(tiny_server):
    assert "/nope" in _error(requests.get(tiny_server.url + "/nope", timeout=10), 404)["message"]
    error = _error(requests.get(tiny_server.url + "/v1/completions", timeout=10), 405)
    assert "POST" in error["message"]
    _error(requests.delete(tiny_server.url + "/generate", timeout=10), 405)


def test_openapi_documents_the_error_responses(tiny_server):
    schema = requests.get(tiny_server.url + "/openapi.json", timeout=10).json()
    error_ref = "#/components/schemas/ErrorResponse"
    for path in ("/generate", "/v1/completions", CHAT):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses, path
        for code in ("400", "401", "413", "503"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, code)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"text": "Count", "sampling_params": {**GREEDY, "max_new_tokens": 3000}}),
        ("/v1/completions", {"prompt": "Count", "max_tokens": 3000, "ignore_eos": True}),
        (CHAT, {"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True}),
    ],
)
def test_non_streaming_client_disconnect_aborts_the_request(tiny_server, path, body):
    def server_info():
        return requests.get(tiny_server.url + "/server_info", timeout=10).json()

    kv_used = server_info()["kv_tokens_used"]
    with pytest.raises(requests.Timeout):
        requests.post(tiny_server.url + path, json=body, timeout=1.0)  # leaves long before it ends
    deadline = time.time() + 10
    while time.time() < deadline:
        info = server_info()
        if info["num_running_reqs"] == 0 and info["kv_tokens_used"] == kv_used:
            break
        time.sleep(0.1)
    assert info["num_running_reqs"] == 0 and info["kv_tokens_used"] == kv_used
