"""Where a TKNP decode step's time goes: each part of a decoder layer, timed alone and side by side.

    python benchmark/tknp/bench_layer_parts.py --num-requests 16 --context-len 1024 \
        --measured "tknp 1=593,tknp 2 [0|1]=331,tknp 2 [0|1] tbo=287"

Builds the real model (random weights in SmolLM2-135M's shape, bf16, sgl_kernel) and times,
per layer, the two parts a TKNP root and its ranks run in a decode step:
  - `dense`: the root's fused halves around attention (decode_layer_qkv: norm, q/k/v
    projection, rotary; decode_layer_out: o_proj, norm, MLP) over `rows` requests;
  - `attention`: storing k/v and decode attention of `rows` requests over `--context-len`
    cached tokens each (what the owner of those requests runs);
and a whole layer over every request on two threads, as one fused call (`decode_layer`, what
tknp 1 runs) and split around the attention backend (what a TKNP root runs, less the exchange).
Each is timed as a step runs it, over every layer in turn, so weights and KV come from memory
rather than from a cache one layer would keep warm; with 1 and 2 threads. Then, in two
processes bound to one core each and started together (`side by side`), the pairs a TKNP group
runs at the same time: two ranks' attention (tknp 2 with a core per rank), and the root's dense
layers beside a rank's attention (what two-batch overlap makes concurrent). A part that runs
slower beside another shares what limits it (memory bandwidth) with it, and splitting the
work over ranks cannot speed it up on this host.

From those it prints each configuration's critical path per layer (the parts that cannot run at
the same time, with side-by-side times where parts run together) beside the layer time that the
server's measured decode tokens/s implies (`--measured`, from bench_tknp.py): the gap is what no
part explains (per-layer messages and wake-ups, the step's Python, logits).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from bench_kernels import timed  # noqa: E402
from bench_tknp import SHAPES, make_model  # noqa: E402


def _timed(fn, repeats: int) -> float:
    """Median seconds of one call (bench_kernels.timed gives milliseconds)."""
    return timed(fn, repeats) / 1e3


class LayerParts:
    """The model's layers on sgl_kernel and a KV pool of `requests` x `context_len` tokens."""

    def __init__(self, model_dir: str, requests: int, context_len: int, repeats: int):
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.model_executor.model_runner import ModelRunner

        B, C = requests, context_len
        config = ModelConfig.from_path(model_dir, dtype="bfloat16")
        self.runner = ModelRunner(config, "cpu", "cpu", 0.5, max_total_tokens=B * (C + 1), max_running_requests=B)
        self.layers = [layer.fused_decode for layer in self.runner.model.model.layers]
        if any(fused is None for fused in self.layers):
            raise SystemExit("no fused decode layer here (it needs sgl_kernel's bf16 linears)")
        self.hidden_size = config.hf_config.hidden_size
        self.context_len, self.requests, self.repeats = C, B, repeats
        # request i holds slots [i * C, (i + 1) * C) and writes its new token at slot B * C + i
        pool = self.runner.req_to_token_pool.req_to_token
        for i in range(B):
            pool[i, : C + 1] = torch.cat([torch.arange(i * C, (i + 1) * C), torch.tensor([B * C + i])])
        for fused in self.layers:
            for cache in self.runner.kv_pool.get_kv_buffer(fused.layer_id):
                cache.normal_()

    def dense(self, rows: int) -> float:
        """Seconds per layer of the two fused halves over `rows` requests."""
        hidden, residual = (torch.randn(rows, self.hidden_size, dtype=torch.bfloat16) for _ in range(2))
        positions = torch.full((rows,), self.context_len, dtype=torch.int64)
        heads, _, head_dim = self.layers[0].sizes[:3]
        attn = torch.randn(rows, heads * head_dim, dtype=torch.bfloat16)

        def run():
            for f in self.layers:
                f.ops.decode_layer_qkv(
                    hidden, residual, True, f.weights, f.biases, f.sizes, f.eps, positions, *f.cos_sin
                )
                f.ops.decode_layer_out(attn, residual, f.weights, f.biases, f.sizes, f.eps)

        return _timed(run, self.repeats) / len(self.layers)

    def _batch(self, rows: int):
        """A decode batch of the first `rows` requests, attached to the runner's pools."""
        from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode

        C, B = self.context_len, self.requests
        batch = ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=torch.zeros(rows, dtype=torch.int64),
            positions=torch.full((rows,), C, dtype=torch.int64),
            out_cache_loc=torch.arange(B * C, B * C + rows),
            req_pool_indices=torch.arange(rows),
            seq_lens=torch.full((rows,), C + 1, dtype=torch.int64),
            seq_lens_cpu=[C + 1] * rows,
            kv_lens=[C] * rows,
            extend_lens=[1] * rows,
            sample_indices=torch.arange(rows),
        )
        self.runner.attach(batch)
        self.runner.attn_backend.init_forward_metadata(batch)
        return batch

    def attention(self, rows: int) -> float:
        """Seconds per layer of storing k/v and attending, for the first `rows` requests."""
        batch, backend = self._batch(rows), self.runner.attn_backend
        heads, kv_heads, head_dim = self.layers[0].sizes[:3]
        q = torch.randn(rows, heads, head_dim, dtype=torch.bfloat16)
        k, v = (torch.randn(rows, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))

        def run():
            for f in self.layers:
                backend.forward(q, k, v, f.attention, batch)

        return _timed(run, self.repeats) / len(self.layers)

    def layer(self, rows: int, split: bool) -> float:
        """Seconds per whole layer over `rows` requests: as one fused call (`decode_layer`, what
        tknp 1 runs) or split around the attention backend's Python (what a TKNP root runs, less
        the exchange)."""
        batch = self._batch(rows)
        hidden, residual = (torch.randn(rows, self.hidden_size, dtype=torch.bfloat16) for _ in range(2))

        def run():
            for f in self.layers:
                if split:
                    f._split(batch.positions, hidden, residual, False, batch)
                else:
                    f(batch.positions, hidden, residual, batch)

        return _timed(run, self.repeats) / len(self.layers)


def _side(core: int, part: str, rows: int, model_dir: str, args: argparse.Namespace, ready, out) -> None:
    """One process of a side-by-side pair: one core, one thread, `part` timed once both are ready."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    parts = LayerParts(model_dir, args.num_requests, args.context_len, args.repeats * 3)
    ready.wait()
    out.put((core, getattr(parts, part)(rows)))


def side_by_side(pair: list[tuple[str, int]], model_dir: str, args: argparse.Namespace) -> list[float]:
    """Seconds per layer of each (part, rows) of `pair`, run at once on cores 0 and 1."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_side, args=(core, part, rows, model_dir, args, ready, out))
        for core, (part, rows) in enumerate(pair)
    ]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return [results[core] for core in range(len(pair))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--measured", default="", help="config=decode tok/s pairs from bench_tknp.py, e.g. 'tknp 1=593,tknp 2=318'"
    )
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores")
    B, half, quarter = args.num_requests, args.num_requests // 2, max(args.num_requests // 4, 1)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.shape, tmp)
        parts = LayerParts(model_dir, B, args.context_len, args.repeats)
        alone = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in sorted({B, half, quarter}):
                alone["dense", rows, threads] = parts.dense(rows)
                alone["attention", rows, threads] = parts.attention(rows)
        torch.set_num_threads(2)
        whole = {split: parts.layer(B, split) for split in (False, True)}
        num_layers = len(parts.layers)
        del parts
        attn_pair = side_by_side([("attention", half), ("attention", half)], model_dir, args)
        dense_beside = side_by_side([("dense", B), ("attention", half)], model_dir, args)
        tbo_beside = side_by_side([("dense", half), ("attention", quarter)], model_dir, args)

    print(f"shape={args.shape} bf16 requests={B} context={args.context_len} layers={num_layers}")
    print("\nalone, per layer (us; the median of passes over every layer)")
    print(f"{'part':>10} {'rows':>5} {'1 thread':>9} {'2 threads':>10} {'speed-up':>9}")
    for (name, rows, threads), seconds in sorted(alone.items()):
        if threads == 1:
            two = alone[name, rows, 2]
            print(f"{name:>10} {rows:>5} {seconds * 1e6:>9.0f} {two * 1e6:>10.0f} {seconds / two:>8.2f}x")
    print(
        f"\nwhole layer, {B} rows, 2 threads (us): fused {whole[False] * 1e6:.0f}, "
        f"split around the attention {whole[True] * 1e6:.0f} ({whole[True] / whole[False]:.2f}x)"
    )
    print("\nside by side, one core each, per layer (us): core 0 | core 1, and the slowdown against alone")
    for (a, b), (ta, tb) in (
        ((("attention", half), ("attention", half)), attn_pair),
        ((("dense", B), ("attention", half)), dense_beside),
        ((("dense", half), ("attention", quarter)), tbo_beside),
    ):
        sa, sb = ta / alone[a[0], a[1], 1], tb / alone[b[0], b[1], 1]
        print(f"{a[0]:>10}({a[1]:>2}) {ta * 1e6:>6.0f} {sa:.2f}x | {b[0]}({b[1]:>2}) {tb * 1e6:>6.0f} {sb:.2f}x")

    p = lambda name, rows, threads: alone[name, rows, threads]  # noqa: E731
    paths = {
        # one process, both cores: the dense layers, then every request's attention
        "tknp 1": p("dense", B, 2) + p("attention", B, 2),
        # the root's dense layers on both cores (auto lends it the rank's), then the root and
        # the rank attend their halves side by side, on a core each
        "tknp 2": p("dense", B, 2) + max(attn_pair),
        # the same, each micro-batch's dense half on both cores: no core idles for the overlap
        # to fill, so at best it costs the second pass over the weights
        "tknp 2 tbo": 2 * p("dense", half, 2) + max(attn_pair),
        # the root's dense layers on its core, then the two ranks attend side by side
        "tknp 2 [0|1]": p("dense", B, 1) + max(attn_pair),
        # per layer and micro-batch the root's dense half runs beside a rank's attention; the
        # root attends its own quarter after (its part of the micro-batch)
        "tknp 2 [0|1] tbo": 2 * (max(tbo_beside) + p("attention", quarter, 1)),
    }
    measured = dict(item.split("=") for item in args.measured.split(",") if item)
    print(f"\n{'config':>18} {'critical path per layer (us)':>29} {'per layer at measured tok/s (us)':>33}")
    for config, seconds in paths.items():
        tok_s = measured.get(config)
        actual = f"{B / float(tok_s) / num_layers * 1e6:>33.0f}" if tok_s else ""
        print(f"{config:>18} {seconds * 1e6:>29.0f} {actual}")


if __name__ == "__main__":
    main()
