"""Runs the peer runners one after another on the same workloads and tabulates output tokens/s.

    .venv/bin/python benchmark/peers/run_all.py [--tools engine,transformers,llamacpp,vllm]
        [--workloads 1x128/128,8x128/128,32x128/128,8x1024/64] [--repeats 3] [--output FILE.md]

Each tool runs as its own process in its own venv (never two at once):
  engine        .venv/bin/python        bench_engine.py        sglang.Engine, Q4_1 GGUF run in bf16
  transformers  .venv/bin/python        bench_transformers.py  generate(), bf16 safetensors
  llamacpp      .peers/llama/bin/python bench_llamacpp.py      llama.cpp batch API, f16 GGUF
  vllm          .peers/vllm/bin/python  bench_vllm.py          vllm.LLM (CPU build), bf16 safetensors
A tool whose venv (install.sh) or weights (prepare_weights.py) are missing is skipped with a
message. The table (markdown) goes to stdout and to --output (default
.peers/results/peers-<date>.md), and the JSON records beside it (same name, .jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import DEFAULT_REPEATS, DEFAULT_WORKLOADS, default_paths, parse_result, parse_workloads  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = default_paths()


def tools() -> dict:
    venv = os.path.join(PATHS["root"], ".venv", "bin", "python")
    return {
        "engine": dict(
            label="engine",
            python=venv,
            script="bench_engine.py",
            installed=None,
            weights=None,
            setup="make install-test",
        ),
        "transformers": dict(
            label="transformers",
            python=venv,
            script="bench_transformers.py",
            installed=None,
            weights=PATHS["hf_dir"],
            setup="make install-test",
        ),
        "llamacpp": dict(
            label="llama.cpp f16",
            python=os.path.join(PATHS["peers"], "llama", "bin", "python"),
            script="bench_llamacpp.py",
            installed=os.path.join(PATHS["peers"], "llama", ".installed"),
            weights=PATHS["f16_gguf"],
            setup="bash benchmark/peers/install.sh llama",
        ),
        "vllm": dict(
            label="vLLM CPU",
            python=os.path.join(PATHS["peers"], "vllm", "bin", "python"),
            script="bench_vllm.py",
            installed=os.path.join(PATHS["peers"], "vllm", ".installed"),
            weights=PATHS["hf_dir"],
            setup="bash benchmark/peers/install.sh vllm",
        ),
    }


def cpu_info() -> dict:
    model, flags = platform.processor() or "?", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    if not flags and os.path.exists("/proc/cpuinfo"):
        m = re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M)
        flags = set(m.group(1).split()) if m else set()
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"]
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "model": model,
        "flags": {f: f in flags for f in wanted},
        "cpus": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_gib, 1),
    }


def run_tool(name: str, spec: dict, args, log_file) -> tuple[list[dict], str | None]:
    """Runs one runner; returns its records and an error message (None when it succeeded)."""
    if not os.path.exists(spec["python"]) or (spec["installed"] and not os.path.exists(spec["installed"])):
        return (
            [],
            f"skipped: its venv is missing or incomplete ({os.path.dirname(os.path.dirname(spec['python']))}); run `{spec['setup']}`",
        )
    if spec["weights"] and not os.path.exists(spec["weights"]):
        return [], f"skipped: {spec['weights']} is missing; run `.venv/bin/python benchmark/peers/prepare_weights.py`"
    cmd = [
        spec["python"],
        os.path.join(HERE, spec["script"]),
        "--workloads",
        args.workloads,
        "--repeats",
        str(args.repeats),
    ]
    if args.nice:
        cmd = ["nice", "-n", str(args.nice), *cmd]
    load = os.getloadavg()[0]
    busy = load > 0.5
    print(f"\n=== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if busy:
        print(
            f"    warning: 1-minute load average is {load:.2f} before {name} starts: other work on the "
            "machine will distort its figures",
            file=sys.stderr,
            flush=True,
        )
    args.loads[name] = load
    log_file.write(f"\n=== {name}: {' '.join(cmd)}\n")
    records = []
    start = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=PATHS["root"]
    )
    try:
        for line in proc.stdout:
            log_file.write(line)
            rec = parse_result(line)
            if rec is not None:
                records.append(rec)
                print(f"    {rec['tool']} {rec['workload']}: {rec['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            elif args.verbose or line.startswith("[bench_") or "Error" in line or "error" in line[:80]:
                sys.stderr.write("    " + line)
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    except KeyboardInterrupt:
        proc.kill()
        raise
    print(f"    ({time.time() - start:.0f} s, exit {rc})", file=sys.stderr, flush=True)
    if rc != 0:
        return records, f"failed: exit {rc} (see the log)"
    return records, None


def fmt(x: float | None) -> str:
    return "—" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")


def table(names: list[str], specs: dict, workloads: list[str], by: dict) -> str:
    cols = [specs[n]["label"] for n in names]
    ratio_peers = [n for n in names if n != "engine"] if "engine" in names else []
    head = ["workload", *[f"{c} tok/s" for c in cols], *[f"engine / {specs[n]['label']}" for n in ratio_peers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for w in workloads:
        vals = [by.get((n, w)) for n in names]
        cells = [w, *[fmt(v) for v in vals]]
        ours = by.get(("engine", w))
        for n in ratio_peers:
            peer = by.get((n, w))
            cells.append("—" if not ours or not peer else f"{ours / peer:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_tools = list(tools())
    parser.add_argument("--tools", default=",".join(all_tools), help="comma-separated subset of " + ",".join(all_tools))
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated NxIN/OUT specs")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument(
        "--output", default=None, help="markdown file to write (default .peers/results/peers-<date>.md)"
    )
    parser.add_argument("--nice", type=int, default=0, help="run each runner under `nice -n N` (0: not)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per tool")
    parser.add_argument("--verbose", action="store_true", help="echo everything the runners print")
    args = parser.parse_args()
    workloads = [w.name for w in parse_workloads(args.workloads)]
    args.workloads = ",".join(workloads)
    specs = tools()
    names = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {all_tools}")

    now = datetime.datetime.now()
    output = args.output or os.path.join(PATHS["peers"], "results", f"peers-{now:%Y%m%d-%H%M%S}.md")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    base = os.path.splitext(output)[0]
    by, records, notes = {}, [], {}
    args.loads = {}
    with open(base + ".log", "w") as log_file:
        for name in names:
            recs, err = run_tool(name, specs[name], args, log_file)
            if err:
                print(f"    {name}: {err}", file=sys.stderr, flush=True)
                notes[name] = err
            for r in recs:
                by[(name, r["workload"])] = r["tok_s"]
                records.append(r)
    with open(base + ".jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    cpu = cpu_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    threads = {r["tool"]: r.get("threads") for r in records}
    versions = {r["tool"]: r.get("version") for r in records}
    md = [
        "# Engine vs peers: output tokens/s (prefill included)",
        "",
        f"- date: {now:%Y-%m-%d %H:%M}",
        f"- CPU: {cpu['model']}, {cpu['cpus']} CPUs, {cpu['mem_gib']} GiB; {flags}",
        "- threads (torch.get_num_threads / n_threads): " + ", ".join(f"{k} {v}" for k, v in threads.items()),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- 1-minute load average before each tool (ideally ~0): "
        + ", ".join(f"{k} {v:.2f}" for k, v in args.loads.items()),
        "- model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized; engine/transformers/vLLM bf16, llama.cpp f16)",
        f"- metric: N*OUT / wall time of the whole batch, median of {args.repeats} run(s) after one warm-up; "
        "greedy, EOS ignored, random token prompts",
        "",
        table(names, specs, workloads, by),
        "",
    ]
    for n, note in notes.items():
        md.append(f"- {specs[n]['label']}: {note}")
    text = "\n".join(md).rstrip() + "\n"
    with open(output, "w") as f:
        f.write(text)
    print(text)
    print(f"written: {output} (+ .jsonl, .log)", file=sys.stderr)
    return 1 if any(note.startswith("failed") for note in notes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
