"""Server start-up errors, API keys, clean shutdown and backend failure."""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
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
    assert not _socket_dirs() - before, "socket directory removed"


def test_dead_backend_process_fails_requests_and_exits_nonzero(make_tiny_model):
    server = ServerProcess(
        ["--model-path", str(make_tiny_model("llama", seed=3)), "--dtype", "float32", "--max-total-tokens", "4096"]
    )
    try:
        t, result = _start_long_request(server)
        _wait_running(server)
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
    assert not _socket_dirs() - before  # (other servers on this host may remove theirs meanwhile)


def _tiny_server_args(make_tiny_model, *extra: str) -> list[str]:
    return [
        "--model-path",
        str(make_tiny_model("llama", seed=3)),
        "--dtype",
        "float32",
        "--max-total-tokens",
        "4096",
        *extra,
    ]


def _start_long_request(server: ServerProcess) -> tuple[threading.Thread, dict]:
    """A 4000-token /generate on a thread; its response lands in result["r"]."""
    result: dict = {}

    def run():
        body = {"text": "Count", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        result["r"] = requests.post(server.url + "/generate", json=body, timeout=60)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _wait_running(server: ServerProcess, n: int = 1) -> None:
    deadline = time.time() + 30
    while requests.get(server.url + "/server_info").json()["num_running_reqs"] < n:
        assert time.time() < deadline, "the request never started"
        time.sleep(0.01)


def test_sigterm_aborts_what_outlives_the_graceful_deadline_and_exits_0(make_tiny_model):
    server = ServerProcess(_tiny_server_args(make_tiny_model, "--graceful-shutdown-timeout", "1"))
    try:
        t, result = _start_long_request(server)
        _wait_running(server)
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        t.join(timeout=15)
        assert not t.is_alive(), "the in-flight request must be answered"
        meta = result["r"].json()["meta_info"]
        assert meta["finish_reason"] == {"type": "abort", "message": "the server is shutting down"}
        assert 0 < meta["completion_tokens"] < 4000  # what it generated before the deadline
        assert server.proc.wait(timeout=15) == 0
        assert time.time() - start < 1 + 8
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_restart_after_kill_9_removes_the_dead_servers_socket_dir(make_tiny_model):
    first = ServerProcess(_tiny_server_args(make_tiny_model))
    # named after its owner (other servers may run on this host meanwhile)
    left = {d for d in _socket_dirs() if os.path.basename(d).startswith(f"sglang-tknp-{first.proc.pid}-")}
    kids = _children(first.proc.pid)
    first.proc.kill()
    first.proc.wait()
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert left and left <= _socket_dirs(), "SIGKILL leaves the socket directory behind"
    second = ServerProcess(_tiny_server_args(make_tiny_model))
    try:
        assert not left & _socket_dirs(), "the next start removed it"
    finally:
        second.stop()
    assert not any(os.path.basename(d).startswith(f"sglang-tknp-{second.proc.pid}-") for d in _socket_dirs())


def test_max_queued_requests_503_with_retry_after_and_latency_histograms(make_tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    server = ServerProcess(
        _tiny_server_args(
            make_tiny_model, "--max-running-requests", "1", "--max-queued-requests", "1", "--enable-metrics"
        )
    )
    try:
        body = {"text": "Count", "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(requests.post, server.url + "/generate", json=body, timeout=60) for _ in range(4)]
            _wait_running(server)
            completion = requests.post(
                server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "stream": True}, timeout=60
            )
            replies = [f.result() for f in futures]
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 503 in codes, codes
        refused = next(r for r in replies if r.status_code == 503)
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == 503 and "--max-queued-requests" not in error["message"] and error["param"] is None
        assert completion.status_code == 503 and completion.headers["Retry-After"] == "1"
        assert completion.json()["error"]["type"] == "service_unavailable"
        # a streamed request, for inter-token latency
        r = requests.post(
            server.url + "/generate", json={**body, "stream": True, "sampling_params": {"max_new_tokens": 5}}
        )
        assert r.status_code == 200
        metrics = requests.get(server.url + "/metrics").text
        for name in (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "queue_time_seconds",
            "time_per_output_token_seconds",
        ):
            count = next(line for line in metrics.splitlines() if line.startswith(f"sglang:{name}_count"))
            assert float(count.split()[-1]) > 0, count
            assert f"sglang:{name}_bucket{{" in metrics and f"sglang:{name}_sum{{" in metrics
        assert 'sglang:num_running_reqs{model_name="' in metrics and 'tknp_rank="0"' in metrics
    finally:
        server.stop()


def test_sigterm_during_start_up_exits_0_and_removes_the_socket_dir(make_tiny_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--port", str(port), *_tiny_server_args(make_tiny_model)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        mine = lambda: {d for d in _socket_dirs() if os.path.basename(d).startswith(f"sglang-tknp-{proc.pid}-")}
        deadline = time.time() + 60
        while not mine() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert mine(), "the backend started (its socket directory exists)"
        proc.send_signal(signal.SIGTERM)  # while the scheduler still loads: not ready yet
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not mine()
    finally:
        if proc.poll() is None:
            proc.kill()
