"""Structured output: 32 concurrent requests constrained by a JSON schema against the same requests
unconstrained, in one run, on the embedded default model (sglang.Engine, in-process).

    .venv/bin/python benchmark/structured/bench_constrained.py [--num-requests 32] [--repeats 3]
        [--max-new-tokens 160] [--dtype bfloat16]

Prints the CPU, then:
  1. compile: a fresh GrammarBackend on the model's tokenizer (TokenizerInfo build time), then
     the cold compile (cache miss) of the schema, the median of 5 variants that differ only in
     their "title" (so each one misses the cache);
  2. throughput: the N prompts (chat template, each asking for one JSON profile) go in as one
     engine.generate call, greedy, capped at --max-new-tokens; unconstrained requests end at
     EOS or the cap, constrained ones when the grammar ends. Modes alternate (U, S, C, ...)
     after one untimed warm-up of each; every constrained run uses a schema the engine has not
     seen (a new "title"), so its wall time includes one cold compile. Output tokens/s = all
     output tokens / wall time (prefill included); the ratio pairs each C with the U before it.
     A third mode, S, runs the same prompts unconstrained with each request's max_new_tokens set
     to its constrained output's length (ignore_eos): the same prefill and the same number of
     tokens, so C / S is the grammar's own cost (C / U also counts that the unconstrained model
     writes longer answers, over which the prefill spreads);
  3. per step, from timers wrapped around the engine's own functions during the timed runs:
     the median decode step while at least 3/4 of the N requests run (about the same batch in
     both modes, so the cleanest view of the grammar's per-step cost), and the mean per step
     of the forward, the whole sampling (SamplingBatchInfo build + sampler, the fill
     included), the bitmask fill (allocation + one matcher fill per constrained row) and the
     bitmask application in the sampler;
  4. a micro-benchmark of fill + apply at batch N on the real vocabulary: N matchers of the
     schema, each advanced to a different point of one valid output, [N, V] float32 logits.
Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peers"))
from run_all import cpu_info  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"type": "string", "enum": ["engineer", "designer", "manager", "scientist", "teacher"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 32}, "country": {"type": "string", "maxLength": 32}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "skills", "address", "active"],
    "additionalProperties": False,
}
# One valid output, to advance the micro-benchmark's matchers along.
SAMPLE_OUTPUT = (
    '{"name": "Ada Lovelace", "age": 36, "role": "scientist", "skills": ["mathematics", "writing"], '
    '"address": {"city": "London", "country": "United Kingdom"}, "active": true}'
)
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana"]
JOBS = ["engineer", "designer", "manager", "scientist"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto"]


def schema_text(title: str) -> str:
    """The schema with a "title", which the grammar ignores but the compile cache keys on."""
    return json.dumps({"title": title, **SCHEMA})


def prompts(tokenizer: Any, num: int) -> list[str]:
    """`num` distinct chat prompts, each asking for one JSON profile."""
    out = []
    for i in range(num):
        name, job, city = NAMES[i % len(NAMES)], JOBS[(i // len(NAMES)) % len(JOBS)], CITIES[i % len(CITIES)]
        ask = (
            f"Describe a fictional {job} named {name} who lives in {city}, as one JSON object with the fields "
            "name, age, role, skills (a list), address (city, country) and active (true or false). "
            "Reply with the JSON only."
        )
        messages = [{"role": "user", "content": ask}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


class Timers:
    """Seconds and calls per name, from functions wrapped with `wrap`; and the durations of the
    decode steps that ran at least 3/4 of the requests at once (`full_decode`, with their
    batch sizes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.full_decode: list[tuple[int, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def wrap_run(self, fn: Callable, batch_size: int) -> Callable:
        """Times the scheduler's `_run(batch)` (forward, sampling, finish checks) of the decode
        steps whose batch holds at least 3/4 of `batch_size` requests (some unconstrained ones end
        early: the band keeps enough steps in both modes, at a slightly smaller batch in that one)."""

        def timed(batch: Any) -> Any:
            full = 4 * len(batch.items) >= 3 * batch_size and all(it.extend_len == 1 for it in batch.items)
            start = time.perf_counter()
            try:
                return fn(batch)
            finally:
                if full:
                    self.full_decode.append((len(batch.items), time.perf_counter() - start))

        return timed

    def reset(self) -> tuple[dict[str, tuple[float, int]], list[tuple[int, float]]]:
        snapshot = {k: (self.seconds[k], self.calls[k]) for k in self.seconds}, self.full_decode
        self.seconds, self.calls, self.full_decode = {}, {}, []
        return snapshot


def instrument(engine: Any, batch_size: int) -> Timers:
    """Wraps the scheduler's step, run and forward, the sampling, the bitmask fill and its
    application."""
    import sglang.srt.layers.sampler as sampler_module

    timers = Timers()
    sched = engine.scheduler
    sched.step = timers.wrap("step", sched.step)
    sched._run = timers.wrap_run(sched._run, batch_size)
    sched.forward = timers.wrap("forward", sched.forward)
    sched.output.sample = timers.wrap("sample", sched.output.sample)
    sched.output._token_bitmask = timers.wrap("bitmask_fill", sched.output._token_bitmask)
    sampler_module.apply_token_bitmask = timers.wrap("bitmask_apply", sampler_module.apply_token_bitmask)
    return timers


def compile_times(tokenizer: Any, vocab_size: int, repeats: int = 5) -> dict[str, float]:
    from sglang.srt.constrained.grammar_backend import GrammarBackend

    start = time.perf_counter()
    backend = GrammarBackend.from_tokenizer(tokenizer, vocab_size)
    tokenizer_info_s = time.perf_counter() - start
    cold = []
    for i in range(repeats):
        start = time.perf_counter()
        backend.submit(("json_schema", schema_text(f"compile {i}"))).result()
        cold.append(time.perf_counter() - start)
    start = time.perf_counter()
    backend.submit(("json_schema", schema_text("compile 0"))).result()
    hit_s = time.perf_counter() - start
    backend.shutdown()
    return {
        "tokenizer_info_ms": round(1e3 * tokenizer_info_s, 1),
        "compile_cold_ms": round(1e3 * statistics.median(cold), 2),
        "compile_cold_min_ms": round(1e3 * min(cold), 2),
        "compile_cold_max_ms": round(1e3 * max(cold), 2),
        "cache_hit_ms": round(1e3 * hit_s, 3),
    }


def micro_bitmask(tokenizer: Any, vocab_size: int, batch: int, steps: int = 200) -> dict[str, float]:
    """Fill + apply at batch `batch`: matchers spread along SAMPLE_OUTPUT, real vocabulary."""
    import torch
    from sglang.srt.constrained.grammar_backend import Grammar, GrammarBackend
    from sglang.srt.layers import sampler as sampler_module
    from sglang.srt.managers.output_processor import OutputProcessor
    from sglang.srt.sampling.sampling_batch_info import TokenBitmask

    backend = GrammarBackend.from_tokenizer(tokenizer, vocab_size)
    compiled = backend.submit(("json_schema", schema_text("micro"))).result()
    backend.shutdown()
    ids = tokenizer.encode(SAMPLE_OUTPUT, add_special_tokens=False)

    class _Req:  # what OutputProcessor._token_bitmask reads of a request
        def __init__(self, grammar: Grammar):
            self.grammar = grammar

    reqs = []
    for i in range(batch):
        grammar = Grammar(compiled)
        for token in ids[: i * len(ids) // batch]:
            assert grammar.accept_token(token), "SAMPLE_OUTPUT does not match SCHEMA"
        reqs.append(_Req(grammar))
    output = OutputProcessor(tokenizer, set(), vocab_size)
    logits = torch.randn(batch, vocab_size)
    fill, apply = [], []
    for _ in range(steps):
        start = time.perf_counter()
        rows, bitmask = output._token_bitmask(reqs)
        filled = time.perf_counter()
        mask = TokenBitmask(rows=torch.tensor(rows), bitmask=bitmask)  # as SamplingBatchInfo.build makes it
        x = logits.clone()
        start_apply = time.perf_counter()
        sampler_module.apply_token_bitmask(x, mask)
        fill.append(filled - start)
        apply.append(time.perf_counter() - start_apply)
    return {
        "batch": batch,
        "fill_ms_median": round(1e3 * statistics.median(fill), 3),
        "fill_ms_min": round(1e3 * min(fill), 3),
        "apply_ms_median": round(1e3 * statistics.median(apply), 3),
        "apply_ms_min": round(1e3 * min(apply), 3),
    }


def print_runs(runs: list[dict], num_requests: int, max_new_tokens: int) -> tuple[list[float], list[float]]:
    """The runs as a markdown table; returns the tok/s ratios and the decode-step time ratios
    (unconstrained / constrained) of each repeat."""
    print()
    print(f"{num_requests} concurrent requests, greedy, max_new_tokens {max_new_tokens}:")
    header = (
        "| repeat | mode | tok/s | wall s | output tokens | mean len | hit cap | valid JSON | steps | ms/step "
        "| decode step (steps x batch) | forward | sample | bitmask fill | bitmask apply |"
    )
    print(header)
    print("|---:|---|" + "---:|" * 13)
    for r in runs:
        ph = r["phase_ms_per_step"]
        print(
            f"| {r['repeat']} | {r['mode']} | {r['tok_s']} | {r['elapsed_s']} | {r['output_tokens']} | "
            f"{r['mean_output_len']} | {r['finished_by_length']} | {r['valid_json']}/{num_requests} | "
            f"{r['steps']} | {r['ms_per_step']} | {r['full_decode_ms']} ({r['full_decode_steps']} x "
            f"{r['full_decode_batch']}) | "
            f"{ph.get('forward', 0)} | {ph.get('sample', 0)} | "
            f"{ph.get('bitmask_fill', '-')} | {ph.get('bitmask_apply', '-')} |"
        )
    by_repeat = [{r["mode"]: r for r in runs if r["repeat"] == i} for i in sorted({r["repeat"] for r in runs})]
    ratios = [rep["constrained"]["tok_s"] / rep["unconstrained"]["tok_s"] for rep in by_repeat]
    print(
        f"\nconstrained / unconstrained tok/s per repeat: {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"median {statistics.median(ratios):.2f}"
    )
    same = [rep["constrained"]["tok_s"] / rep["same_lengths"]["tok_s"] for rep in by_repeat]
    print(
        "constrained / unconstrained with the constrained outputs' lengths (ignore_eos), tok/s per repeat: "
        f"{', '.join(f'{x:.2f}' for x in same)}; median {statistics.median(same):.2f}"
    )
    decode_ratios = [
        rep["unconstrained"]["full_decode_ms"] / rep["constrained"]["full_decode_ms"]
        for rep in by_repeat
        if rep["unconstrained"]["full_decode_ms"] and rep["constrained"]["full_decode_ms"]
    ]
    print(
        "decode step (>= 3/4 of the requests running), unconstrained / constrained time: "
        f"{', '.join(f'{x:.2f}' for x in decode_ratios)}"
    )
    return ratios, decode_ratios


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32, help="concurrent requests (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="cap of both modes (default: %(default)s)")
    parser.add_argument("--model-path", default=None, help="default: the project's default model")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import torch
    from sglang import Engine
    from sglang.srt.model_loader import resolve_model_path

    cpu = cpu_info()
    flags = " ".join(f"{f}={'yes' if on else 'no'}" for f, on in cpu["flags"].items())
    print(f"CPU: {cpu['model']}, {cpu['cpus']} cpus, {cpu['mem_gib']} GiB; {flags}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads")

    model_path = resolve_model_path(args.model_path)
    engine = Engine(model_path=model_path, dtype=args.dtype, log_level="warning")
    tokenizer, vocab_size = engine.tokenizer, engine.model_config.vocab_size
    print(f"model: {os.path.basename(model_path)} ({args.dtype}), vocabulary {vocab_size}")

    compile_info = compile_times(tokenizer, vocab_size)
    print(
        f"compile: TokenizerInfo {compile_info['tokenizer_info_ms']} ms (once per engine); schema cold "
        f"{compile_info['compile_cold_ms']} ms median (min {compile_info['compile_cold_min_ms']}, max "
        f"{compile_info['compile_cold_max_ms']}), cache hit {compile_info['cache_hit_ms']} ms"
    )

    batch = prompts(tokenizer, args.num_requests)
    timers = instrument(engine, args.num_requests)
    num_runs = {"constrained": 0}
    lengths: list[int] = []  # of the constrained outputs (greedy: the same every run)

    def run(mode: str) -> dict[str, Any]:
        params: Any = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
        if mode == "constrained":
            params["json_schema"] = schema_text(f"run {num_runs['constrained']}")  # a cold compile each run
            num_runs["constrained"] += 1
        elif mode == "same_lengths":  # unconstrained, each request as long as its constrained output
            params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lengths]
        engine.flush_cache()
        timers.reset()
        start = time.perf_counter()
        results = engine.generate(batch, sampling_params=params)
        elapsed = time.perf_counter() - start
        phases, full_decode = timers.reset()
        tokens = [r["meta_info"]["completion_tokens"] for r in results]
        reasons = [r["meta_info"]["finish_reason"]["type"] for r in results]
        valid = sum(_is_valid(r["text"]) for r in results)
        steps = phases["step"][1]
        per_step = {name: round(1e3 * s / steps, 3) for name, (s, _) in phases.items() if name != "step"}
        return {
            "mode": mode,
            "elapsed_s": round(elapsed, 3),
            "output_tokens": sum(tokens),
            "tok_s": round(sum(tokens) / elapsed, 1),
            "mean_output_len": round(statistics.mean(tokens), 1),
            "finished_by_length": reasons.count("length"),
            "valid_json": valid,
            "steps": steps,
            "ms_per_step": round(1e3 * elapsed / steps, 2),
            # the median decode step with at least 3/4 of the requests running, and their mean batch
            "full_decode_steps": len(full_decode),
            "full_decode_batch": round(statistics.mean(b for b, _ in full_decode), 1) if full_decode else None,
            "full_decode_ms": round(1e3 * statistics.median(s for _, s in full_decode), 2) if full_decode else None,
            "phase_ms_per_step": per_step,
            "lengths": tokens,
        }

    for mode in ("unconstrained", "constrained"):
        r = run(mode)
        log(f"warm-up {mode}: {r['elapsed_s']} s, {r['tok_s']} tok/s")
        if mode == "constrained":
            lengths = r["lengths"]
    runs = []
    for i in range(args.repeats):
        for mode in ("unconstrained", "same_lengths", "constrained"):
            r = run(mode)
            r["repeat"] = i
            del r["lengths"]
            runs.append(r)
            log(f"repeat {i} {mode}: {r['elapsed_s']} s, {r['tok_s']} tok/s, load {os.getloadavg()[0]:.2f}")

    ratios, decode_ratios = print_runs(runs, args.num_requests, args.max_new_tokens)
    micro = micro_bitmask(tokenizer, vocab_size, args.num_requests)
    print(
        f"micro-benchmark, batch {micro['batch']}, vocabulary {vocab_size}: fill {micro['fill_ms_median']} ms "
        f"(min {micro['fill_ms_min']}), apply {micro['apply_ms_median']} ms (min {micro['apply_ms_min']}) per step"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    engine.shutdown()
    record = {
        "cpu": cpu,
        "args": vars(args),
        "compile": compile_info,
        "runs": runs,
        "ratios": [round(x, 3) for x in ratios],
        "decode_step_ratios": [round(x, 3) for x in decode_ratios],
        "micro": micro,
    }
    print(json.dumps(record))
    return 0


def _is_valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


if __name__ == "__main__":
    sys.exit(main())
