"""vLLM's CPU build on the peer workloads: vllm.LLM.generate on the whole batch at once.

    .peers/vllm/bin/python benchmark/peers/bench_vllm.py [--workloads 8x128/128,...] [--repeats 3]

Loads the bf16 safetensors folder that prepare_weights.py wrote, dtype bfloat16, and runs each
batch as one LLM.generate() call on N token-id prompts with SamplingParams(temperature=0,
max_tokens=OUT, min_tokens=OUT, ignore_eos=True). vLLM's own scheduler (continuous batching,
chunked prefill) batches them. Environment, unless already set:
  VLLM_CPU_KVCACHE_SPACE=4 (GiB of KV cache; --kv-cache-gib), VLLM_CPU_OMP_THREADS_BIND=0-<ncpu-1>,
  VLLM_CPU_NUM_OF_RESERVED_CPU=0 (OpenMP threads on every core),
  LD_PRELOAD=<libtcmalloc_minimal.so.4>:<venv>/lib/libiomp5.so as vLLM's CPU install guide
  recommends, for the libraries that are present (install.sh installs them; the script re-executes
  itself with it; --no-preload to skip).
Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import add_common_args, default_paths, emit, log, max_batch, max_tokens_per_seq, measure, parse_workloads  # noqa: E402


def preload_libs() -> list[str]:
    """tcmalloc and Intel OpenMP, as vLLM's CPU guide sets LD_PRELOAD, where present."""
    import glob

    found = []
    for pattern in (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib64/libtcmalloc_minimal.so.4",
        "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    ):
        if os.path.exists(pattern):
            found.append(pattern)
            break
    found += glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))[:1]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model-dir", default=default_paths()["hf_dir"])
    parser.add_argument("--check", metavar="PROMPT", default=None, help="print a greedy continuation and exit")
    parser.add_argument("--check-tokens", type=int, default=24)
    parser.add_argument("--no-preload", action="store_true", help="do not LD_PRELOAD tcmalloc / libiomp5")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0, help="VLLM_CPU_KVCACHE_SPACE unless set")
    args = parser.parse_args()
    workloads = parse_workloads(args.workloads)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        log(f"no model at {args.model_dir}: run benchmark/peers/prepare_weights.py first")
        return 2

    if not args.no_preload and "PEERS_VLLM_PRELOADED" not in os.environ:
        libs = [lib for lib in preload_libs() if lib not in os.environ.get("LD_PRELOAD", "")]
        if libs:
            env = dict(
                os.environ,
                PEERS_VLLM_PRELOADED="1",
                LD_PRELOAD=":".join([*libs, *filter(None, [os.environ.get("LD_PRELOAD")])]),
            )
            os.execve(sys.executable, [sys.executable, *sys.argv], env)

    ncpu = len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gib:g}")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    max_len = max_tokens_per_seq(workloads) if args.check is None else 512
    max_seqs = max_batch(workloads) if args.check is None else 1
    llm = LLM(
        model=args.model_dir,
        dtype="bfloat16",
        max_model_len=max_len,
        max_num_seqs=max(max_seqs, 1),
        seed=0,
        tokenizer=args.model_dir,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    if args.check is not None:
        out = llm.generate([args.check], SamplingParams(temperature=0, max_tokens=args.check_tokens), use_tqdm=False)
        print(json.dumps({"check_output": out[0].outputs[0].text}), flush=True)
        return 0

    def run_batch(prompts: list[list[int]], output_len: int) -> int:
        params = SamplingParams(temperature=0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    for w in workloads:
        runs = measure(w, args.repeats, vocab, run_batch, log=log)
        emit(
            "vllm",
            w,
            runs,
            version=vllm.__version__,
            model=os.path.basename(args.model_dir),
            weights="bf16 safetensors (dequantized Q4_1)",
            dtype="bfloat16",
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            omp_bind=os.environ["VLLM_CPU_OMP_THREADS_BIND"],
            kv_cache_gib=os.environ["VLLM_CPU_KVCACHE_SPACE"],
            max_model_len=max_len,
            max_num_seqs=max_seqs,
            ld_preload=os.environ.get("LD_PRELOAD", ""),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
