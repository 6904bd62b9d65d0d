"""Latency of one static batch: prefill, then decode steps, straight through the model runner.

    python -m sglang.bench_one_batch --batch-size 32 --input-len 128 --output-len 128 [--dtype bfloat16] [--profile]

No scheduler and no server: this measures the forward path (model, attention backend, sampler)
and the per-step batch preparation, as SGLang's bench_one_batch does. `--profile` runs the
decode steps under torch.profiler and prints where their time goes, op by op.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.output_processor import OutputProcessor
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq
from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_loader import resolve_model_path
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs


@dataclasses.dataclass
class BenchArgs:
    batch_size: int = 1
    input_len: int = 128
    output_len: int = 128
    seed: int = 0


def run_once(runner: ModelRunner, bench: BenchArgs, profile: bool = False) -> dict:
    kv = KVCacheManager(runner.req_to_token_pool, runner.allocator, runner.kv_pool, disable_radix_cache=True)
    cfg = runner.model_config
    out = OutputProcessor(None, set(), cfg.vocab_size)
    gen = torch.Generator().manual_seed(bench.seed)
    params = SamplingParams(temperature=0, max_new_tokens=bench.output_len, ignore_eos=True)
    params.normalize()
    reqs = [
        Req(f"r{i}", torch.randint(0, cfg.vocab_size, (bench.input_len,), generator=gen).tolist(), params, seed=i)
        for i in range(bench.batch_size)
    ]
    for req in reqs:
        assert kv.start(req), "not enough request slots"

    def step(items: list[ScheduledReq]) -> float:
        start = time.perf_counter()
        batch = ScheduleBatch(items)
        slots = kv.alloc_extend([(it.req, it.extend_len) for it in items])
        assert slots is not None, "KV pool too small for this benchmark"
        logits = runner.forward(batch.to_forward_batch(slots))
        sampled = out.sample(batch, logits)
        for it, token in zip(items, sampled.next_token_ids.tolist()):
            it.req.kv_len += it.extend_len
            it.req.output_ids.append(token)
        return time.perf_counter() - start

    prefill = step([ScheduledReq(r, bench.input_len, True) for r in reqs])
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if profile
        else contextlib.nullcontext() as prof
    ):
        decodes = [step([ScheduledReq(r, 1, True) for r in reqs]) for _ in range(bench.output_len - 1)]
    if profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    for req in reqs:
        kv.release(req)
    total = prefill + sum(decodes)
    median = statistics.median(decodes) if decodes else float("nan")
    return {
        "prefill_latency_s": prefill,
        "prefill_tok_s": bench.batch_size * bench.input_len / prefill,
        "decode_median_latency_s": median,
        "decode_tok_s": bench.batch_size / median,
        "total_latency_s": total,
        "output_tok_s": bench.batch_size * bench.output_len / total,
    }


def build_runner(cfg: ModelConfig, server_args: ServerArgs) -> ModelRunner:
    """A runner per the (resolved) flags, CUDA graphs included unless --disable-cuda-graph."""
    return ModelRunner(
        cfg,
        server_args.device,
        server_args.attention_backend,
        server_args.mem_fraction_static,
        server_args.max_total_tokens,
        server_args.max_running_requests,
        page_size=server_args.page_size,
        cuda_graph_max_bs=None if server_args.disable_cuda_graph else server_args.cuda_graph_max_bs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    for f in dataclasses.fields(BenchArgs):
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the measured one")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the decode steps")
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args).resolve()
    bench = BenchArgs(args.batch_size, args.input_len, args.output_len, args.seed)
    cfg = ModelConfig.from_path(
        resolve_model_path(server_args.model_path), server_args.dtype, server_args.context_length, server_args.device
    )
    runner = build_runner(cfg, server_args)
    for _ in range(args.warmup):
        run_once(runner, dataclasses.replace(bench, output_len=min(bench.output_len, 4)))
    r = run_once(runner, bench, args.profile)
    print(
        f"model={cfg.model_path} dtype={str(cfg.dtype).replace('torch.', '')} threads={torch.get_num_threads()} "
        f"batch={bench.batch_size} input={bench.input_len} output={bench.output_len}"
    )
    print(f"prefill: {r['prefill_latency_s'] * 1e3:.1f} ms, {r['prefill_tok_s']:.1f} tok/s")
    print(f"decode:  {r['decode_median_latency_s'] * 1e3:.2f} ms/step (median), {r['decode_tok_s']:.1f} tok/s")
    print(f"total:   {r['total_latency_s']:.2f} s, {r['output_tok_s']:.1f} output tok/s")


if __name__ == "__main__":
    main()
