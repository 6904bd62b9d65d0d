"""Server start-up errors, API keys, clean shutdown and backend failure."""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import requests
from conftest import ServerProcess

pytestmark = pytest.mark.slow  # server processes


def _children(pid: int) -> list[int]:
    kids = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as f:
                fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            kids.append(int(status.split("/")[2]))
    return kids


def _backend_processes(pid: int) -> list[int]:
    """The server's scheduler and detokenizer (not multiprocessing's resource tracker), in start order."""
    found = []
    for kid in sorted(_children(pid)):
        with open(f"/proc/{kid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(kid)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


def _socket_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "sglang-tknp-*")))


@pytest.mark.parametrize(
    "args,word",
    [
        (["--port", "0"], "--port"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
        (["--model-path", "/nonexistent/model"], "does not exist"),
        (["--dtype", "float64"], "--dtype"),
        (["--chunked-prefill-size", "0"], "--chunked-prefill-size"),
        (["--attention-backend", "flashattn"], "--attention-backend"),
        (
            ["--attention-backend", "flashinfer", "--device", "cpu"],
            "--attention-backend flashinfer cannot run here: it needs CUDA",
        ),
        (["--tknp-size", "2", "--dp-size", "2"], "mutually exclusive"),
        (["--pp-size", "2"], "pipeline parallelism is not supported"),
        (["--tknp-size", "0"], "--tknp-size"),
        (["--load-balance-method", "random"], "--load-balance-method"),
        (["--tp-size", "2"], "--tp-size 2 must divide the number of attention heads (9)"),  # SmolLM2-135M
        (["--tp-size", "0"], "--tp-size"),
        (["--tknp-size", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
        (
            ["--tknp-size", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:5000"],
            "must split evenly over --nnodes",
        ),
        (["--tknp-size", "2", "--nnodes", "2", "--dist-init-addr", "localhost"], "--dist-init-addr must be host:port"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be in 0..1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, word):
    r = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert word in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_the_flags():
    r = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for flag in (
        "--model-path",
        "--host",
        "--port",
        "--tp-size",
        "--mem-fraction-static",
        "--max-total-tokens",
        "--chunked-prefill-size",
        "--schedule-policy",
        "--api-key",
        "--enable-metrics",
        "--watchdog-timeout",
    ):
        assert flag in r.stdout


def test_api_key_protects_everything_but_health(make_tiny_model):
    server = ServerProcess(
        [
            "--model-path",
            str(make_tiny_model("llama", seed=3)),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "1024",
            "--api-key",
            "sekret",
            "--enable-metrics",
        ]
    )
    try:
        assert requests.get(server.url + "/health").status_code == 200
        for method, path in [
            ("get", "/v1/models"),
            ("get", "/get_model_info"),
            ("get", "/server_info"),
            ("post", "/generate"),
            ("post", "/flush_cache"),
            ("get", "/metrics"),
        ]:
            assert getattr(requests, method)(server.url + path).status_code == 401, path
        auth = {"Authorization": "Bearer sekret"}
        assert requests.get(server.url + "/v1/models", headers=auth).status_code == 200
        r = requests.post(
            server.url + "/generate", headers=auth, json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}
        )
        assert r.status_code == 200
        metrics = requests.get(server.url + "/metrics", headers=auth).text
        assert "sglang:generation_tokens_total" in metrics and "sglang:num_running_reqs" in metrics
    finally:
        server.stop()


def test_sigterm_stops_children_and_removes_sockets(make_tiny_model):
    before = _socket_dirs()
    server = ServerProcess(
        ["--model-path", str(make_tiny_model("llama", seed=3)), "--dtype", "float32", "--max-total-tokens", "1024"]
    )
    kids = _children(server.proc.pid)
    assert len(_backend_processes(server.proc.pid)) == 2, "scheduler and detokenizer run in their own processes"
    assert _socket_dirs() - before
    server.stop()
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids), "no orphan processes"
    assert _socket_dirs() == before, "socket directory removed"


def test_dead_backend_process_fails_requests_and_exits_nonzero(make_tiny_model):
    server = ServerProcess(
        ["--model-path", str(make_tiny_model("llama", seed=3)), "--dtype", "float32", "--max-total-tokens", "4096"]
    )
    try:
        import threading

        result = {}

        def run():
            body = {"text": "Count", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
            result["r"] = requests.post(server.url + "/generate", json=body, timeout=60)

        t = threading.Thread(target=run)
        t.start()
        while requests.get(server.url + "/server_info").json()["num_running_reqs"] == 0:
            time.sleep(0.01)
        os.kill(_backend_processes(server.proc.pid)[0], signal.SIGKILL)  # the scheduler
        t.join(timeout=15)
        assert not t.is_alive(), "the in-flight request must end"
        assert result["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert server.proc.wait(timeout=15) != 0
        assert server.proc.returncode == 1
    finally:
        server.stop()


def test_watchdog_ends_a_stuck_step(make_tiny_model):
    # a timeout far below one step's duration makes every step "stuck"
    server = ServerProcess(
        [
            "--model-path",
            str(make_tiny_model("llama", seed=3)),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "1024",
            "--watchdog-timeout",
            "0.0001",
        ]
    )
    try:
        r = requests.post(
            server.url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 50}}, timeout=30
        )
        assert r.json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert server.proc.wait(timeout=15) == 1
    finally:
        server.stop()


def test_backend_start_failure_is_one_line_and_leaves_nothing_behind(make_tiny_model):
    before = _socket_dirs()
    # the scheduler process cannot size a KV cache from 1% of memory: it fails during start-up
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(make_tiny_model("llama", seed=3)),
            "--mem-fraction-static",
            "0.01",
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "KV cache" in r.stderr and "Traceback" not in r.stderr
    assert _socket_dirs() == before
