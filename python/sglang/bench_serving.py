"""Online serving benchmark: requests sent to a running server at a chosen rate, as SGLang's
`bench_serving` sends them, with client-side latencies.

    python -m sglang.bench_serving --backend sglang --dataset-name random --num-prompts 64 \\
        --random-input-len 256 --random-output-len 64 --request-rate 8 --max-concurrency 16

Backends: `sglang` (POST /generate, SSE), `sglang-oai` (POST /v1/completions), `sglang-oai-chat`
(POST /v1/chat/completions). Datasets: `random` (prompts of random token ids, decoded to text;
lengths uniform in [len * ratio, len]) and `sharegpt` (a local ShareGPT JSON file given by
--dataset-path; nothing is downloaded). Requests start as a Poisson process of
--request-rate per second (inf: all at once), at most --max-concurrency in flight.

Reports request throughput, input/output tokens/s, and mean/median/p99 of time to first token
(TTFT), inter-token latency (ITL: the gap between stream chunks, spread over the tokens a chunk
brings), time per output token after the first (TPOT) and end-to-end latency; --output-file
appends the figures as one JSON line. Standard library HTTP only (one thread per request in
flight), so it runs wherever the server's package is installed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import random
import statistics
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from tqdm import tqdm

BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat")
_HTTP_TIMEOUT_S = 6 * 3600


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


# ---- HTTP -------------------------------------------------------------------------------------


class Client:
    def __init__(self, base_url: str):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SystemExit(f"--base-url must look like http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname, url.port or (443 if self.https else 80)
        self.headers = {"Content-Type": "application/json"}
        # as SGLang's client: a Bearer OPENAI_API_KEY, or the raw API_KEY
        if os.environ.get("OPENAI_API_KEY"):
            self.headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        elif os.environ.get("API_KEY"):
            self.headers["Authorization"] = os.environ["API_KEY"]

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 30.0) -> tuple[int, Any]:
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data) if data else None
            except ValueError:
                return resp.status, data.decode(errors="replace")
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Iterator[tuple[float, Any]]:
        """(arrival time, decoded event) per SSE `data:` line, until `data: [DONE]`; raises on an
        HTTP error or an error event."""
        conn = self._connect(_HTTP_TIMEOUT_S)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read().decode(errors='replace')[:300]}")
            if not body.get("stream", False):
                yield time.perf_counter(), json.loads(resp.read())
                return
            for raw in resp:
                line = raw.decode().strip()
                if not line:
                    continue
                now = time.perf_counter()
                payload = line[len("data:") :].strip() if line.startswith("data:") else line
                if payload == "[DONE]":
                    return
                event = json.loads(payload)  # anything else (a ping, a comment) fails the request
                if isinstance(event, dict) and "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                yield now, event
        finally:
            conn.close()


# ---- datasets ---------------------------------------------------------------------------------


def _length(rng: random.Random, full: int, ratio: float) -> int:
    return rng.randint(max(1, int(full * ratio)), full) if ratio < 1 else full


def random_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    vocab = len(tokenizer)
    reqs = []
    for _ in range(args.num_prompts):
        n_in = _length(rng, args.random_input_len, args.random_range_ratio)
        n_out = _length(rng, args.random_output_len, args.random_range_ratio)
        ids = [rng.randrange(100, vocab - 100) for _ in range(n_in)]
        reqs.append(BenchRequest(tokenizer.decode(ids), n_in, n_out))
    return reqs


def sharegpt_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    if not args.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file; nothing is downloaded)")
    with open(args.dataset_path) as f:
        conversations = [d["conversations"] for d in json.load(f) if len(d.get("conversations", [])) >= 2]
    random.Random(args.seed).shuffle(conversations)
    reqs = []
    for conv in conversations:
        if len(reqs) == args.num_prompts:
            break
        prompt, completion = conv[0]["value"], conv[1]["value"]
        n_in, n_out = len(tokenizer.encode(prompt)), len(tokenizer.encode(completion))
        if args.sharegpt_output_len:
            n_out = args.sharegpt_output_len
        # as SGLang filters: too short to measure, or too long for a 2048-token context
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
            continue
        reqs.append(BenchRequest(prompt, n_in, n_out))
    return reqs


# ---- one request ------------------------------------------------------------------------------


def request_body(args: argparse.Namespace, model: str, req: BenchRequest) -> tuple[str, dict]:
    stream = not args.disable_stream
    if args.backend == "sglang":
        params = {"temperature": 0.0, "max_new_tokens": req.output_len, "ignore_eos": not args.disable_ignore_eos}
        body = {"text": req.prompt, "sampling_params": params, "stream": stream}
        path = "/generate"
    elif args.backend == "sglang-oai":
        body = {
            "model": model,
            "prompt": req.prompt,
            "best_of": 1,
            "max_tokens": req.output_len,
            "stream": stream,
            "temperature": 0.0,
            "ignore_eos": not args.disable_ignore_eos,
        }
        path = "/v1/completions"
    else:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": req.prompt}],
            "stream": stream,
            "max_completion_tokens": req.output_len,
            "temperature": 0.0,
            "ignore_eos": not args.disable_ignore_eos,
        }
        path = "/v1/chat/completions"
    if stream and args.backend != "sglang":
        body["stream_options"] = {"include_usage": True}
    body.update(args.extra_request_body)
    return path, body


def _event_text_and_counts(backend: str, event: dict) -> tuple[str, Optional[int], Optional[int]]:
    """(text carried, completion tokens so far or None, prompt tokens or None)."""
    if backend == "sglang":
        meta = event.get("meta_info", {})
        return event.get("text", ""), meta.get("completion_tokens"), meta.get("prompt_tokens")
    usage = event.get("usage") or {}
    text = ""
    if event.get("choices"):
        choice = event["choices"][0]
        if backend == "sglang-oai":
            text = choice.get("text") or ""
        else:
            part = choice.get("delta") or choice.get("message") or {}
            text = (part.get("content") or "") + (part.get("reasoning_content") or "")
    elif not usage:
        raise RuntimeError(f"an event with neither choices nor usage: {event}")
    return text, usage.get("completion_tokens"), usage.get("prompt_tokens")


def run_request(client: Client, args: argparse.Namespace, model: str, req: BenchRequest) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len, output_len=req.output_len)
    path, body = request_body(args, model, req)
    start = last = time.perf_counter()
    tokens_seen = 0
    try:
        for now, event in client.stream(path, body):
            text, completion_tokens, prompt_tokens = _event_text_and_counts(args.backend, event)
            if prompt_tokens is not None:
                result.prompt_len = prompt_tokens
            if completion_tokens is not None:
                result.output_len = completion_tokens
            if not text:
                continue
            new_tokens = max(1, (completion_tokens or tokens_seen + 1) - tokens_seen)
            if tokens_seen == 0:
                result.ttft = now - start
            else:
                result.itl += [(now - last) / new_tokens] * new_tokens
            tokens_seen += new_tokens
            last = now
        result.e2e = time.perf_counter() - start
        result.success = True
    except Exception as exc:  # a failed request is counted, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---- the run ----------------------------------------------------------------------------------


def _arrival_times(n: int, rate: float, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def benchmark(
    client: Client, args: argparse.Namespace, model: str, reqs: list[BenchRequest]
) -> tuple[list[RequestResult], float]:
    bar = tqdm(total=len(reqs), disable=args.disable_tqdm, desc="requests")

    def one(req: BenchRequest) -> RequestResult:
        result = run_request(client, args, model, req)
        bar.update(1)
        return result

    # the pool's threads are the requests in flight: --max-concurrency caps them
    workers = min(len(reqs), args.max_concurrency or len(reqs)) or 1
    with cf.ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        futures = []
        for req, at in zip(reqs, _arrival_times(len(reqs), args.request_rate, args.seed)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, req))
        results = [f.result() for f in futures]
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def _stats(name: str, values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values) or [0.0]
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms), f"p99_{name}_ms": p99}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    metrics = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_throughput": (input_tokens + output_tokens) / duration,
        "concurrency": sum(r.e2e for r in ok) / duration,
    }
    metrics.update(_stats("ttft", [r.ttft for r in ok]))
    metrics.update(_stats("itl", [x for r in ok for x in r.itl]))
    metrics.update(_stats("tpot", tpot))
    metrics.update(_stats("e2e_latency", [r.e2e for r in ok]))
    return metrics


def print_report(args: argparse.Namespace, m: dict[str, Any], errors: list[str]) -> None:
    rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}"
    lines = [
        ("Backend", args.backend),
        ("Request rate (req/s)", rate),
        ("Max concurrency", args.max_concurrency or "-"),
        ("Successful requests", m["completed"]),
        ("Failed requests", m["failed"]),
        ("Benchmark duration (s)", f"{m['duration']:.2f}"),
        ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{m['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_throughput']:.2f}"),
        ("Concurrency", f"{m['concurrency']:.2f}"),
    ]
    for name, label in (
        ("e2e_latency", "E2E Latency"),
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token"),
        ("itl", "Inter-Token Latency"),
    ):
        lines += [
            (f"{kind.capitalize()} {label} (ms)", f"{m[f'{kind}_{name}_ms']:.2f}") for kind in ("mean", "median", "p99")
        ]
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    for label, value in lines:
        print(f"{label:<42}{value!s:>18}")
    print("=" * 60)
    for error in errors[:3]:
        print("failed:", error)


# ---- entry point ------------------------------------------------------------------------------


def _wait_ready(client: Client, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = client.request("GET", "/v1/models", timeout=5)
            if status == 200:
                return body
            problem = f"HTTP {status}: {body}"
        except OSError as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise SystemExit(f"{client.base_url} not ready after {timeout:.0f} s: {problem}")
        time.sleep(1)


def _load_tokenizer(client: Client, args: argparse.Namespace) -> Any:
    from sglang.srt.model_loader import load_tokenizer

    path = args.tokenizer
    if path is None:
        status, info = client.request("GET", "/model_info")
        if status != 200 or not isinstance(info, dict):
            raise SystemExit(f"{client.base_url}/model_info answered {status}; pass --tokenizer")
        path = info.get("tokenizer_path") or info.get("model_path")
    return load_tokenizer(path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="sglang", choices=BACKENDS)
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name for the OpenAI backends (default: the server's first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the server's, from /model_info)")
    p.add_argument("--dataset-name", default="random", choices=("random", "sharegpt"))
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file for --dataset-name sharegpt")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override ShareGPT completion lengths")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * ratio, len]")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run")
    p.add_argument("--extra-request-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--output-file", default=None, help="append the results as one JSON line")
    p.add_argument("--ready-check-timeout-sec", type=float, default=60.0)
    args = p.parse_args(argv)
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.random_range_ratio <= 1:
        p.error("--random-range-ratio must be in [0, 1]")
    if args.request_rate <= 0:
        p.error("--request-rate must be > 0 (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    client = Client(args.base_url or f"http://{args.host}:{args.port}")
    models = _wait_ready(client, args.ready_check_timeout_sec)
    model = args.model or models["data"][0]["id"]
    tokenizer = _load_tokenizer(client, args)
    reqs = (random_requests if args.dataset_name == "random" else sharegpt_requests)(args, tokenizer)
    if args.flush_cache:
        client.request("POST", "/flush_cache", {})
    for req in reqs[: args.warmup_requests]:
        warm = run_request(client, args, model, BenchRequest(req.prompt, req.prompt_len, min(req.output_len, 16)))
        if not warm.success:
            raise SystemExit(f"the warmup request failed: {warm.error}")
    results, duration = benchmark(client, args, model, reqs)
    metrics = summarize(results, duration)
    print_report(args, metrics, [r.error for r in results if not r.success])
    if args.output_file:
        status, server_info = client.request("GET", "/server_info")
        record = {
            **{k: v for k, v in vars(args).items() if k != "extra_request_body"},
            **metrics,
            "server_info": server_info if status == 200 else None,
        }
        record["request_rate"] = str(args.request_rate)
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    return metrics


if __name__ == "__main__":
    main()
