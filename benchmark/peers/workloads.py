"""The workloads every peer runner measures, and what they share (no sglang import here).

A workload "NxIN/OUT" is N requests of IN random prompt tokens each, generating exactly OUT
tokens each (greedy, EOS ignored), all N submitted at once. Its figure is output tokens/s
including prefill: N*OUT / wall time from submission of the batch to its last token, the
median over --repeats timed runs after one untimed warm-up run of the same shape.

Prompts are token ids drawn uniformly from [FIRST_ID, vocab_size) by a generator seeded from
the workload spec and the run index, so every tool sees the very same prompts, and each run
(warm-up included) gets fresh ones: no tool gains from a prefix cache across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import statistics
import sys
import zlib

DEFAULT_WORKLOADS = ("1x128/128", "8x128/128", "32x128/128", "8x1024/64")
DEFAULT_REPEATS = 3
# The lowest ids of most vocabularies are special or control tokens (SmolLM2: 0..16 are
# <|endoftext|>, <|im_start|>, ...); staying above 1000 keeps clear of them.
FIRST_ID = 1000
WARMUP_RUN = -1


@dataclasses.dataclass(frozen=True)
class Workload:
    num: int
    input_len: int
    output_len: int

    @property
    def name(self) -> str:
        return f"{self.num}x{self.input_len}/{self.output_len}"

    @property
    def output_tokens(self) -> int:
        return self.num * self.output_len

    def prompts(self, vocab_size: int, run: int) -> list[list[int]]:
        """The N prompts of timed run `run` (0, 1, ...) or of the warm-up (WARMUP_RUN)."""
        rng = random.Random(zlib.crc32(f"{self.name}#{run}".encode()))
        return [[rng.randrange(FIRST_ID, vocab_size) for _ in range(self.input_len)] for _ in range(self.num)]


def parse_workload(spec: str) -> Workload:
    """'NxIN/OUT', e.g. '8x128/128'."""
    try:
        n, rest = spec.strip().lower().split("x", 1)
        i, o = rest.split("/", 1)
        w = Workload(int(n), int(i), int(o))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad workload '{spec}': expected NxIN/OUT, e.g. 8x128/128") from None
    if min(w.num, w.input_len, w.output_len) < 1:
        raise argparse.ArgumentTypeError(f"bad workload '{spec}': all of N, IN, OUT must be >= 1")
    return w


def parse_workloads(specs: str) -> list[Workload]:
    return [parse_workload(s) for s in specs.split(",") if s.strip()]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated NxIN/OUT specs (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed runs per workload; the median is reported (default: %(default)s)",
    )


def max_tokens_per_seq(workloads: list[Workload]) -> int:
    return max(w.input_len + w.output_len for w in workloads)


def max_batch(workloads: list[Workload]) -> int:
    return max(w.num for w in workloads)


def measure(workload: Workload, repeats: int, vocab_size: int, run_batch, log=None) -> list[dict]:
    """Warm up once, then time `repeats` runs. run_batch(prompts, output_len) returns the
    number of output tokens it produced (checked against N*OUT) and takes as long as the
    whole batch; it is timed here with perf_counter."""
    import time

    runs = []
    for r in [WARMUP_RUN, *range(repeats)]:
        prompts = workload.prompts(vocab_size, r)
        start = time.perf_counter()
        produced = run_batch(prompts, workload.output_len)
        elapsed = time.perf_counter() - start
        if produced != workload.output_tokens:
            raise RuntimeError(f"{workload.name}: produced {produced} output tokens, expected {workload.output_tokens}")
        if r != WARMUP_RUN:
            runs.append({"elapsed_s": round(elapsed, 4), "tok_s": round(workload.output_tokens / elapsed, 2)})
        if log:
            log(
                f"{workload.name} {'warm-up' if r == WARMUP_RUN else f'run {r}'}: "
                f"{elapsed:.2f} s, {workload.output_tokens / elapsed:.1f} tok/s"
            )
    return runs


def result_line(tool: str, workload: Workload, runs: list[dict], **info) -> str:
    """One JSON line: tool, workload, tok_s (median of runs), runs, and whatever info
    (threads, dtype, model, ...) the runner adds."""
    rec = {
        "tool": tool,
        "workload": workload.name,
        "tok_s": round(statistics.median(r["tok_s"] for r in runs), 2),
        "runs": runs,
        **info,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    return json.dumps(rec)


def emit(tool: str, workload: Workload, runs: list[dict], **info) -> None:
    print(result_line(tool, workload, runs, **info), flush=True)


def parse_result(line: str) -> dict | None:
    """The result record of a runner's stdout line, None for any other line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and {"tool", "workload", "tok_s"} <= rec.keys() else None


def log(msg: str) -> None:
    print(f"[{os.path.basename(sys.argv[0])}] {msg}", file=sys.stderr, flush=True)


def default_paths() -> dict:
    """Where install.sh and prepare_weights.py put things (override with PEERS_DIR)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    peers = os.environ.get("PEERS_DIR", os.path.join(root, ".peers"))
    weights = os.path.join(peers, "weights")
    return {
        "root": root,
        "peers": peers,
        "weights": weights,
        "hf_dir": os.path.join(weights, "smollm2-135m-instruct-bf16"),
        "f16_gguf": os.path.join(weights, "smollm2-135m-instruct-f16.gguf"),
    }
