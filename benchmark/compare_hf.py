"""The same workload through Hugging Face transformers' generate and through sglang.Engine.

    python benchmark/compare_hf.py --batch-sizes 1,32 --input-len 128 --output-len 128 --dtype bfloat16

Both run in this process on the same weights (the default model unless --model-path), on the
same random prompts (equal lengths, so transformers needs no padding), greedy, exactly
--output-len new tokens each. Prints output tokens/s for both and their ratio per batch size.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers
from sglang.bench_offline_throughput import random_prompts, run
from sglang.srt.entrypoints.engine import Engine
from sglang.srt.model_loader import resolve_model_path

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_hf(model_path: str, dtype: torch.dtype):
    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True).eval()


@torch.no_grad()
def hf_throughput(model, prompts: list[list[int]], output_len: int) -> float:
    ids = torch.tensor(prompts)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + output_len
    return len(prompts) * output_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    model_path = resolve_model_path(args.model_path)
    engine = Engine(model_path=model_path, dtype=args.dtype, log_level="warning")
    hf = load_hf(model_path, _DTYPES[args.dtype])
    print(
        f"model={model_path} dtype={args.dtype} input={args.input_len} output={args.output_len} threads={torch.get_num_threads()}"
    )
    print(f"{'batch':>5} {'transformers tok/s':>19} {'sglang tok/s':>13} {'ratio':>6}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        prompts = random_prompts(bs, args.input_len, engine.model_config.vocab_size, seed=bs)
        ref = hf_throughput(hf, prompts, args.output_len)
        run(engine, prompts[:1], 2, progress=False)  # warm-up
        engine.flush_cache()
        ours = run(engine, prompts, args.output_len, progress=False)["output_tok_s"]
        engine.flush_cache()
        print(f"{bs:>5} {ref:>19.1f} {ours:>13.1f} {ours / ref:>5.2f}x")


if __name__ == "__main__":
    main()
