"""sgl_kernel's operators against what torch runs for the same work, side by side in one process.

    python benchmark/bench_kernels.py [--shape smollm2-135m] [--batch-sizes 1,8,32,128]

Linear: every projection of the shape (qkv, o, gate_up, down, the LM head) at each batch size,
sgl_kernel.linear on prepacked weights against F.linear (oneDNN), in bf16; the ratio is what
`linear_kernel_max_rows` in sglang/srt/layers/linear.py is chosen from. Attention: decode over
a paged pool (batch x context) against the torch_native backend's gathered SDPA, and the kernel
again with its KV cold (`--cold-layers` pools called in turn, as a step's layers read theirs
from memory; 0 skips it). Times are the median of --repeats calls after a warm-up; the machine
is noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import sgl_kernel
import torch
import torch.nn.functional as F

ops = sgl_kernel.ops

# hidden, intermediate, heads, kv heads, head_dim, vocab
SHAPES = {
    "smollm2-135m": (576, 1536, 9, 3, 64, 49152),
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64, 151936),
}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_linear(shape: tuple, batch_sizes: list[int], repeats: int) -> None:
    hidden, inter, heads, kv_heads, head_dim, vocab = shape
    layers = {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (vocab, hidden),
    }
    print(f"linear, bf16, ms per call (isa {sgl_kernel.isa()}, {torch.get_num_threads()} threads)")
    # torch f32: float32 x and weights, what a 16-bit model computed in on CPUs without bf16
    # arithmetic before the kernel ran there
    print(
        f"{'layer':>8} {'N x K':>13} {'batch':>5} {'torch':>8} {'torch f32':>9} {'kernel':>8} {'speed-up':>8} "
        f"{'kernel GB/s':>11}"
    )
    for name, (n, k) in layers.items():
        w = (torch.randn(n, k) / k**0.5).bfloat16()
        w32 = w.float()
        packed = ops.pack_linear_weight(w)
        for m in batch_sizes:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            t_torch = timed(lambda: F.linear(x, w), repeats)
            t_f32 = timed(lambda: F.linear(x32, w32), repeats)
            t_kernel = timed(lambda: ops.linear(x, packed, None, n, False), repeats)
            gbps = w.numel() * 2 / t_kernel / 1e6
            print(
                f"{name:>8} {f'{n}x{k}':>13} {m:>5} {t_torch:8.3f} {t_f32:9.3f} {t_kernel:8.3f} "
                f"{t_torch / t_kernel:7.2f}x {gbps:11.1f}"
            )


def bench_decode_attention(shape: tuple, batch_sizes: list[int], context: int, repeats: int, cold_layers: int) -> None:
    from sglang.srt.layers.attention.torch_native import TorchNativeAttnBackend  # noqa: F401 (the same SDPA call)

    _, _, heads, kv_heads, head_dim, _ = shape
    print(f"decode attention, bf16, context {context}, ms per layer")
    print(f"{'batch':>5} {'torch SDPA':>10} {'kernel':>8} {'speed-up':>8} {'kernel cold':>11} {'cold GB/s':>9}")
    for b in batch_sizes:
        # each request's tokens in a run of slots, as a prefill allocates them; requests shuffled
        slots = (torch.randperm(b).unsqueeze(1) * context + torch.arange(context)).flatten() + 1
        k_cache = torch.randn(b * context + 1, kv_heads, head_dim).bfloat16()
        v_cache = torch.randn_like(k_cache)
        r2t = slots.view(b, context)
        rows = torch.arange(b)
        seq_lens = torch.full((b,), context)
        q = torch.randn(b, heads, head_dim).bfloat16()
        out = torch.empty_like(q)
        mask = torch.ones(b, 1, 1, context, dtype=torch.bool)

        def sdpa():
            k = k_cache[r2t].transpose(1, 2)
            v = v_cache[r2t].transpose(1, 2)
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=True)

        t_torch = timed(sdpa, repeats)
        t_kernel = timed(
            lambda: ops.decode_attention(out, q, k_cache, v_cache, r2t, rows, seq_lens, head_dim**-0.5), repeats
        )
        cold = ""
        if cold_layers:
            pools = [(torch.randn_like(k_cache), torch.randn_like(v_cache)) for _ in range(cold_layers)]

            def every_layer():
                for k, v in pools:
                    ops.decode_attention(out, q, k, v, r2t, rows, seq_lens, head_dim**-0.5)

            t_cold = timed(every_layer, max(3, repeats // 4)) / cold_layers
            kv_bytes = 2 * b * context * kv_heads * head_dim * 2
            cold = f"{t_cold:11.3f} {kv_bytes / t_cold / 1e6:9.1f}"
            del pools
        print(f"{b:>5} {t_torch:10.3f} {t_kernel:8.3f} {t_torch / t_kernel:7.2f}x {cold}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cold-layers", type=int, default=30, help="KV pools the cold attention run cycles through")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    shape = SHAPES[args.shape]
    bench_linear(shape, batch_sizes, args.repeats)
    bench_decode_attention(shape, batch_sizes, args.context, args.repeats, args.cold_layers)


if __name__ == "__main__":
    main()
