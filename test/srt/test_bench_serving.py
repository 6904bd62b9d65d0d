"""`python -m sglang.bench_serving` against a real server, for each backend it speaks."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a server process, and bench_serving as a subprocess


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai", "sglang-oai-chat"])
def test_bench_serving_counts_every_token(tiny_server, tmp_path, backend):
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "sglang.bench_serving",
        "--backend",
        backend,
        "--base-url",
        tiny_server.url,
        "--dataset-name",
        "random",
        "--num-prompts",
        "6",
        "--random-input-len",
        "24",
        "--random-output-len",
        "7",
        "--random-range-ratio",
        "1",
        "--request-rate",
        "20",
        "--max-concurrency",
        "3",
        "--disable-tqdm",
        "--output-file",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Serving Benchmark Result" in r.stdout and "Output token throughput" in r.stdout
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["completed"] == 6 and record["failed"] == 0
    assert record["total_output_tokens"] == 6 * 7, "ignore_eos forces exactly max tokens"
    assert record["total_input_tokens"] >= 6 * 10, "prompt tokens as the server counted them"
    assert 0 < record["mean_ttft_ms"] <= record["mean_e2e_latency_ms"]
    assert record["mean_itl_ms"] > 0 and record["p99_e2e_latency_ms"] >= record["median_e2e_latency_ms"]
    assert record["server_info"]["kv_tokens_used"] == 0


def test_bench_serving_reports_failures_and_bad_flags(tiny_server):
    base = [sys.executable, "-m", "sglang.bench_serving", "--base-url", tiny_server.url, "--disable-tqdm"]
    r = subprocess.run(base + ["--random-range-ratio", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--random-range-ratio" in r.stderr
    # prompts longer than the tiny model's context: every request fails with the server's error
    r = subprocess.run(
        base
        + [
            "--num-prompts",
            "2",
            "--random-input-len",
            "9000",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "1",
            "--warmup-requests",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Failed requests" in r.stdout and "HTTP 400" in r.stdout
