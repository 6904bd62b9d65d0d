"""SGLang's native HTTP API against a real server process (tiny random Llama, float32)."""

import json
import time

import pytest
import requests

pytestmark = pytest.mark.slow  # a server process

GREEDY = {"temperature": 0, "ignore_eos": True}


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
    for out in outs:
        entries = out["meta_info"]["input_token_logprobs"]
        assert len(entries) == out["meta_info"]["prompt_tokens"] - start
        assert entries[0][0] is None and all(isinstance(e[0], float) for e in entries[1:])
        assert all(isinstance(e[2], str) for e in entries)
        assert out["meta_info"]["output_token_logprobs"] == []


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
        ({"json": {"text": "Hi", "sampling_params": {"regex": "[a-z]+"}}}, "regex"),
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
        assert info["max_total_num_tokens"] == 4096 and info["port"] == tiny_server.port
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
