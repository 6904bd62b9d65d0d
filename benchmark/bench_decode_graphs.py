"""Decode throughput with and without CUDA graphs, bench_one_batch style (GPU only).

    python benchmark/bench_decode_graphs.py [--model-path PATH | --shape llama-3.2-1b]
                                            [--batch-sizes 1,32,128] [--input-len 128]
                                            [--output-len 64] [--out graphs.json]

For each setting (graphs off, then on) one ModelRunner is built (--dtype bfloat16, the default
attention backend: flashinfer when installed) and `bench_one_batch.run_once` runs each batch
size: a prefill, then greedy decode steps straight through the runner (no scheduler). It prints
the median decode step latency and tokens/s per batch size and setting, and the speed-up.
Output parity of the two settings is not checked here (flashinfer_parity.py's engines run with
graphs on by default). Exit status: 0 when every run worked, 1 otherwise, 2 when this machine
has no CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import traceback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument(
        "--shape", default=None, help="random weights in a shape of bench_tknp.py instead (no download)"
    )
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_decode_graphs: no CUDA device (torch.cuda.is_available() is False); nothing to measure",
            file=sys.stderr,
        )
        return 2
    from sglang.bench_one_batch import BenchArgs, build_runner, run_once
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import resolve_model_path
    from sglang.srt.server_args import ServerArgs

    if args.shape is not None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tknp"))
        from bench_tknp import make_model

        args.model_path = make_model(args.shape, tempfile.mkdtemp(prefix=f"bench_{args.shape}_"), initializer_range=0.1)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    tokens = max(batch_sizes) * (args.input_len + args.output_len) + 1024
    results, ok = [], True
    for graphs in (False, True):
        server_args = ServerArgs(
            model_path=args.model_path,
            dtype="bfloat16",
            device="cuda",
            max_total_tokens=tokens,
            max_running_requests=max(batch_sizes),
            cuda_graph_max_bs=max(batch_sizes),
            disable_cuda_graph=not graphs,
        ).resolve()
        try:
            cfg = ModelConfig.from_path(
                resolve_model_path(server_args.model_path),
                server_args.dtype,
                server_args.context_length,
                server_args.device,
            )
            runner = build_runner(cfg, server_args)
            assert (runner.cuda_graph_runner is not None) == graphs, "graphs were not set up as asked"
            for bs in batch_sizes:
                bench = BenchArgs(bs, args.input_len, args.output_len)
                run_once(runner, BenchArgs(bs, args.input_len, 4))  # warmup
                r = run_once(runner, bench)
                results.append({"cuda_graph": graphs, "batch_size": bs, **r})
                print(
                    f"graphs={'on ' if graphs else 'off'} batch={bs:4d}: "
                    f"{r['decode_median_latency_s'] * 1e3:7.2f} ms/step, {r['decode_tok_s']:9.1f} decode tok/s",
                    flush=True,
                )
        except Exception:
            traceback.print_exc()
            ok = False
        runner = None
        gc.collect()
        torch.cuda.empty_cache()
    by_key = {(r["cuda_graph"], r["batch_size"]): r for r in results}
    for bs in batch_sizes:
        if (False, bs) in by_key and (True, bs) in by_key:
            speedup = by_key[(True, bs)]["decode_tok_s"] / by_key[(False, bs)]["decode_tok_s"]
            print(f"batch={bs:4d}: CUDA graphs speed decode up {speedup:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
