"""Our engine on the peer workloads: sglang.Engine on the default model's Q4_1 GGUF, run in bf16
(the engine dequantizes the GGUF to float32 and casts to --dtype; the peers load the same
dequantized values, see prepare_weights.py).

    .venv/bin/python benchmark/peers/bench_engine.py [--workloads 8x128/128,...] [--repeats 3]

Each batch goes in as one engine.generate(input_ids=[N prompts]) call, all N requests submitted
at once, greedy (temperature 0) with ignore_eos, so exactly OUT tokens each; the call returns
when the last request finishes. The whole batch is timed, as in sglang.bench_offline_throughput.
Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import add_common_args, emit, log, measure, parse_workloads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model-path", default=None, help="default: the project's default model (Q4_1 GGUF)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    workloads = parse_workloads(args.workloads)

    import sglang
    import torch
    from sglang import Engine
    from sglang.srt.model_loader import resolve_model_path

    model_path = resolve_model_path(args.model_path)
    engine = Engine(model_path=model_path, dtype=args.dtype, log_level="warning")
    info = engine.get_server_info()
    vocab = engine.model_config.vocab_size

    def run_batch(prompts: list[list[int]], output_len: int) -> int:
        params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
        results = engine.generate(input_ids=prompts, sampling_params=params)
        produced = sum(r["meta_info"]["completion_tokens"] for r in results)
        engine.flush_cache()
        return produced

    for w in workloads:
        runs = measure(w, args.repeats, vocab, run_batch, log=log)
        emit(
            "engine",
            w,
            runs,
            version=getattr(sglang, "__version__", "?"),
            model=os.path.basename(model_path),
            weights="Q4_1 GGUF dequantized",
            dtype=args.dtype,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            kv_cache_tokens=info.get("max_total_num_tokens"),
            max_running_requests=info.get("max_running_requests"),
            attention_backend=info.get("attention_backend"),
        )
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
