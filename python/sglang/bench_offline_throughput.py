"""Offline throughput: N random prompts through sglang.Engine, all submitted at once.

    python -m sglang.bench_offline_throughput --num-prompts 32 --input-len 128 --output-len 128

Reports input and output tokens/s over the wall time of the whole batch (continuous batching,
chunked prefill and the prefix cache all take part, as in serving).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from tqdm import tqdm

from sglang.srt.entrypoints.engine import Engine
from sglang.srt.server_args import ServerArgs


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids, which are special tokens in most vocabularies.
    return [[rng.randrange(100, vocab_size) for _ in range(input_len)] for _ in range(num)]


def run(engine: Engine, prompts: list[list[int]], output_len: int, progress: bool = True) -> dict:
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    start = time.perf_counter()
    finished: set[str] = set()
    with tqdm(total=len(prompts), disable=not progress, desc="requests") as bar:
        for chunk in engine.generate(input_ids=prompts, sampling_params=params, stream=True):
            meta = chunk["meta_info"]
            if meta["finish_reason"] is not None and meta["id"] not in finished:
                finished.add(meta["id"])
                bar.update(1)
    elapsed = time.perf_counter() - start
    n_in = sum(len(p) for p in prompts)
    n_out = len(prompts) * output_len
    return {"elapsed_s": elapsed, "input_tok_s": n_in / elapsed, "output_tok_s": n_out / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    engine = Engine(**dataclasses.asdict(server_args))
    prompts = random_prompts(args.num_prompts, args.input_len, engine.model_config.vocab_size, args.seed)
    run(engine, prompts[:2], 4, progress=False)  # warm-up
    engine.flush_cache()
    r = run(engine, prompts, args.output_len)
    print(
        f"requests={args.num_prompts} input={args.input_len} output={args.output_len} dtype={engine.model_config.dtype}"
    )
    print(f"elapsed {r['elapsed_s']:.2f} s | input {r['input_tok_s']:.1f} tok/s | output {r['output_tok_s']:.1f} tok/s")
    engine.shutdown()


if __name__ == "__main__":
    main()
