"""Hugging Face transformers on the peer workloads: model.generate on the whole batch at once.

    .venv/bin/python benchmark/peers/bench_transformers.py [--workloads 8x128/128,...] [--repeats 3]

Loads the bf16 safetensors folder that prepare_weights.py wrote (the default model's GGUF,
dequantized) in bfloat16, and runs each batch as one generate() call on an [N, IN] tensor (all
prompts have the same length, so no padding), greedy, min_new_tokens = max_new_tokens = OUT
(so EOS never ends a row early), with transformers' default (dynamic) KV cache and default
attention implementation. Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import add_common_args, default_paths, emit, log, measure, parse_workloads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model-dir", default=default_paths()["hf_dir"])
    args = parser.parse_args()
    workloads = parse_workloads(args.workloads)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        log(f"no model at {args.model_dir}: run benchmark/peers/prepare_weights.py first")
        return 2

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16, local_files_only=True
    ).eval()
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def run_batch(prompts: list[list[int]], output_len: int) -> int:
        ids = torch.tensor(prompts, dtype=torch.long)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad,
        )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    for w in workloads:
        runs = measure(w, args.repeats, vocab, run_batch, log=log)
        emit(
            "transformers",
            w,
            runs,
            version=transformers.__version__,
            model=os.path.basename(args.model_dir),
            weights="bf16 safetensors (dequantized Q4_1)",
            dtype="bfloat16",
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            attn_implementation=model.config._attn_implementation,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
