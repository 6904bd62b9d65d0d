"""Reliability suite: a real server probed from outside, as clients would, with figures.

    python benchmark/reliability/probe.py                      # the embedded default model
    python benchmark/reliability/probe.py --tknp-size 2
    python benchmark/reliability/probe.py --model-path DIR     # any local model

It starts `python -m sglang.launch_server` (127.0.0.1, a free port, --enable-metrics, by default
--max-total-tokens 4096 and --max-running-requests 16,
--max-queued-requests, --graceful-shutdown-timeout) and runs, in order:
  1. killers: the bodies that once ended the scheduler, and inputs that once answered 5xx;
     each must answer 4xx (or 200 where a clamp is the answer) with /health staying 200;
  2. /health latency while 16 clients ask for heavy logprobs (p50, p99, max);
  3. disconnects: 24 clients (half streaming) with 400-token requests, half leaving after
     0.5 s; how long until the server is idle, and whether every KV slot came back;
  4. overload: 64 concurrent requests against --max-queued-requests; how many were refused
     (503 with Retry-After) and the latency of the admitted;
  5. shutdown: SIGTERM with long requests in flight; time to exit, the clients' finish reasons,
     and whether its socket directory is gone.
It prints one table (markdown); nothing here is a pass/fail test (test/srt holds those).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import requests

KILLERS = {
    "repetition_penalty 1e-300": {"text": "hi", "sampling_params": {"repetition_penalty": 1e-300, "max_new_tokens": 4}},
    "logit_bias 1e300": {
        "text": "hi",
        "sampling_params": {"logit_bias": {"1": 1e300, "2": 1e300}, "temperature": 1, "max_new_tokens": 4},
    },
    "prompt top_logprobs_num 100000": {
        "text": "hello world",
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 100000,
    },
    "custom_params __type__": {"text": "hi", "sampling_params": {"custom_params": {"__type__": "Nope"}}},
    "custom_params __set__": {"text": "hi", "sampling_params": {"custom_params": {"__set__": 1}}},
    "input_ids 5": {"input_ids": 5},
    'input_ids {"0":1}': {"input_ids": {"0": 1}},
    "input_ids [[1],2]": {"input_ids": [[1], 2]},
    'input_ids "hello"': {"input_ids": "hello"},
    'rid {"a":1}': {"text": "hi", "rid": {"a": 1}},
    "sampling_seed 2^64-1": {"text": "hi", "sampling_params": {"sampling_seed": 2**64 - 1}},
    "sampling_seed 1e30": {"text": "hi", "sampling_params": {"sampling_seed": 1e30}},
    "top_k 1e30": {"text": "hi", "sampling_params": {"top_k": 1e30}},
    "lone surrogate": '{"text": "\\ud800"}',
    "custom_params 900 deep": '{"text": "hi", "sampling_params": {"custom_params": ' + '{"a":' * 900 + "1" + "}" * 902,
    "duplicate rid in a batch": {"text": ["a", "b"], "rid": ["dup", "dup"]},
    "prompt larger than the KV cache": None,  # built once the capacity is known
}


def socket_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "sglang-tknp-*")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, extra_args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "sglang.launch_server", "--port", str(self.port), "--enable-metrics", *extra_args]
        self.log = tempfile.TemporaryFile()
        before = socket_dirs()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(before)
        except BaseException:
            self.proc.kill()
            raise

    def _wait_ready(self, before: set[str]) -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"the server exited at start-up:\n{self.log.read().decode()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    self.socket_dirs = socket_dirs() - before  # this server's (other servers may run)
                    return
            except requests.RequestException:  # the socket is bound before the server is ready
                pass
            time.sleep(0.5)
        sys.exit("the server did not become healthy in 600 s")

    def info(self) -> dict:
        return requests.get(self.url + "/get_server_info", timeout=30).json()

    def post(self, body, timeout: float = 120, **kw) -> requests.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(
            self.url + "/generate", data=data, headers={"Content-Type": "application/json"}, timeout=timeout, **kw
        )

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False


def idle(info: dict) -> tuple[int, int]:
    """(running + waiting requests, KV tokens used by requests) summed over ranks."""
    ranks = info.get("internal_states") or [info]
    return sum(r["num_running_reqs"] + r["num_waiting_reqs"] for r in ranks), sum(r["kv_tokens_used"] for r in ranks)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def probe_killers(server: Server, rows: list[tuple[str, str]]) -> None:
    info = server.info()
    capacity = min(r["max_total_num_tokens"] for r in (info.get("internal_states") or [info]))
    if capacity + 8 < info["context_length"]:
        KILLERS["prompt larger than the KV cache"] = {"input_ids": [11] * (capacity + 8)}
    else:
        del KILLERS["prompt larger than the KV cache"]  # the context check answers first
    bad = 0
    for name, body in KILLERS.items():
        r = server.post(body)
        ok = r.status_code < 500 and server.healthy()
        bad += not ok
        message = ""
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"][:70]
            except (ValueError, KeyError, TypeError):
                message = r.text[:70]
        rows.append((f"killer: {name}", f"{r.status_code} {message}" + ("" if ok else "  <-- FAIL")))
    rows.append(("killers answered 5xx or took /health down", str(bad)))


def probe_health_latency(server: Server, rows: list[tuple[str, str]]) -> None:
    body = {
        "text": "The history of the Roman empire " * 20,
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 20,
        "sampling_params": {"max_new_tokens": 64, "temperature": 1},
    }
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                server.post(body, timeout=300)
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=load, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(2)
    latencies = []
    end = time.time() + 15
    while time.time() < end:
        t0 = time.perf_counter()
        requests.get(server.url + "/health", timeout=30)
        latencies.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    rows.append(
        (
            "/health under 16 heavy-logprob clients (ms)",
            f"p50 {pct(latencies, 0.5):.1f}, p99 {pct(latencies, 0.99):.1f}, max {max(latencies):.1f} ({len(latencies)} probes)",
        )
    )


def probe_disconnects(server: Server, rows: list[tuple[str, str]], n: int) -> None:
    _, kv_before = idle(server.info())
    body = {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}

    def client(i: int) -> str:
        stream, leave = i % 2 == 0, i % 4 < 2
        if not stream:
            try:
                r = server.post(body, timeout=0.5 if leave else 600)
                return "done" if r.status_code == 200 else f"refused {r.status_code}"
            except requests.RequestException:
                return "left"
        with server.post({**body, "stream": True}, timeout=600, stream=True) as r:
            if r.status_code != 200:
                return f"refused {r.status_code}"
            start = time.time()
            for _ in r.iter_lines():
                if leave and time.time() - start > 0.5:
                    return "left"  # closing the response drops the connection
        return "done"

    t0 = time.time()
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(client, i) for i in range(n)]
        time.sleep(1.0)
        left = time.time()
        outcomes = [f.result() for f in futures]
    t_all = time.time() - t0
    # the clients that stayed have finished: anything still running belongs to one that left
    while idle(server.info())[0] and time.time() - left < 300:
        time.sleep(0.2)
    busy, kv_after = idle(server.info())
    rows.append(
        (
            f"disconnects: {n} clients with 400-token requests, half streaming, half leaving after 0.5 s",
            f"{outcomes.count('left')} left, {outcomes.count('done')} done in {t_all:.1f} s, "
            f"{n - outcomes.count('left') - outcomes.count('done')} refused; idle after; "
            f"KV used {kv_before} -> {kv_after}, {busy} requests left",
        )
    )


def probe_overload(server: Server, rows: list[tuple[str, str]], n: int) -> None:
    body = {"text": "Count to twenty:", "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}

    def client(_: int) -> tuple[int, float, bool]:
        t0 = time.perf_counter()
        r = server.post(body, timeout=600)
        return r.status_code, time.perf_counter() - t0, "retry-after" in {k.lower() for k in r.headers}

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(client, range(n)))
    admitted = [s for code, s, _ in results if code == 200]
    refused = [(code, ra) for code, _, ra in results if code != 200]
    with_retry = sum(1 for code, ra in refused if code == 503 and ra)
    rows.append(
        (
            f"overload: {n} concurrent requests",
            f"{len(admitted)} admitted (p50 {pct(admitted, 0.5):.2f} s, max {max(admitted, default=0):.2f} s), "
            f"{len(refused)} refused ({with_retry} with 503 + Retry-After)",
        )
    )


def probe_shutdown(server: Server, rows: list[tuple[str, str]]) -> None:
    body = {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.post, body, 600) for _ in range(4)]
        time.sleep(2)
        t0 = time.time()
        server.proc.send_signal(signal.SIGTERM)
        reasons = []
        for f in futures:
            try:
                reasons.append(f.result().json()["meta_info"]["finish_reason"]["type"])
            except Exception as exc:  # a client that got no answer is the failure to report
                reasons.append(type(exc).__name__)
        code = server.proc.wait(timeout=600)
    left = [d for d in server.socket_dirs if os.path.exists(d)]
    rows.append(
        (
            "SIGTERM with 4 long requests in flight",
            f"exit {code} after {time.time() - t0:.1f} s; finish reasons {reasons}; "
            f"socket dirs left behind: {len(left)} of {len(server.socket_dirs)}",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queued-requests", type=int, default=8)
    parser.add_argument("--graceful-shutdown-timeout", type=float, default=5)
    parser.add_argument("--overload-clients", type=int, default=64)
    args, server_args = parser.parse_known_args()
    # small enough that the KV-cache check and the queue limit are reached; flags given win
    for flag, value in (("--max-total-tokens", "4096"), ("--max-running-requests", "16")):
        if flag not in server_args:
            server_args += [flag, value]
    server = Server(
        [
            "--max-queued-requests",
            str(args.max_queued_requests),
            "--graceful-shutdown-timeout",
            str(args.graceful_shutdown_timeout),
            *server_args,
        ]
    )
    rows: list[tuple[str, str]] = [("server args", " ".join(server_args) or "(defaults)")]
    try:
        probe_killers(server, rows)
        probe_health_latency(server, rows)
        # within the running + queued limits, so that no client is refused
        probe_disconnects(server, rows, min(40, args.max_queued_requests + server.info()["max_running_requests"]))
        probe_overload(server, rows, args.overload_clients)
        probe_shutdown(server, rows)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    print("| check | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")


if __name__ == "__main__":
    main()
