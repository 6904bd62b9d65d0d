"""The ranks' transport on one host: shared memory (sgl-kernel shm_*) against gloo over loopback,
on the messages a TKNP layer and a TP all-reduce move.

    python benchmark/tknp/bench_transport.py                  # 2 ranks, each on its own core
    python benchmark/tknp/bench_transport.py --bind all       # ranks sharing every core

For each message size: the round trip of a send root -> rank and a send back (what one TKNP
attention layer costs the root beyond the ranks' attention, q/k/v out and outputs back), and an
all-reduce (a TP row-parallel layer); then the control collectives of one lockstep iteration
(`control`: the message counts, the has-work flags and a step header, DistLockstepGroup).
Each is timed back to back, as a server's layers run them, in blocks of 10 started at a barrier;
times are medians over the blocks of --iters, in microseconds per operation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "peers"))
from run_all import cpu_info  # noqa: E402


def _timed(step, iters: int, block: int = 10) -> float:
    """Microseconds per `step`, both ranks running it back to back as a server's layers do: the
    median over blocks of `block` steps, each block started at a barrier (whose exit times
    differ between the ranks by tens of microseconds: spread over a block, not in each step)."""
    import torch.distributed as dist

    times = []
    for i in range(iters // block + 1):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(block):
            step()
        if i:  # the first block warms up
            times.append((time.perf_counter() - start) / block)
    return statistics.median(times) * 1e6


def _rank(rank: int, world: int, init_file: str, cpus, sizes, iters, dtype, results):
    import torch.distributed as dist
    from sglang.srt.distributed.cpu_binding import spin_count
    from sglang.srt.distributed.parallel_state import all_gather_ints
    from sglang.srt.distributed.shm_comm import SPIN_SECONDS, open_group

    if cpus:
        os.sched_setaffinity(0, cpus[rank])
    torch.set_num_threads(len(cpus[rank]) if cpus else os.cpu_count() or 1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=world, rank=rank)
    path = f"/dev/shm/sglang-bench-{uuid.uuid4().hex[:8]}" if rank == 0 else None
    path = [path]
    dist.broadcast_object_list(path, src=0)
    shm = open_group(
        path[0], rank, world, lambda f: all_gather_ints(f, world, None), spin_count(SPIN_SECONDS) if cpus else 0
    )
    out = {}
    for numel in sizes:
        x = torch.randn(numel).to(dtype)
        buf = torch.empty_like(x)
        for name, send, recv in (
            ("shm", lambda t, to: shm.send(t, to), lambda t, frm: shm.recv_into(t, frm)),
            ("gloo", lambda t, to: dist.send(t, to), lambda t, frm: dist.recv(t, frm)),
        ):

            def round_trip():
                if rank == 0:
                    send(x, 1)
                    recv(buf, 1)
                elif rank == 1:
                    recv(buf, 0)
                    send(buf, 0)

            out[(numel, name, "round trip")] = _timed(round_trip, iters)
        y = torch.zeros_like(x)  # summed over and over, it stays finite
        for name, reduce in (("shm", shm.all_reduce), ("gloo", dist.all_reduce)):
            out[(numel, name, "all-reduce")] = _timed(lambda: reduce(y), iters)
    # one lockstep iteration's control plane: the counts, the has-work flags, a step header
    from sglang.srt.managers.lockstep import DistLockstepGroup

    for name, group in (("shm", DistLockstepGroup(rank, world, None, shm)), ("gloo", DistLockstepGroup(rank, world))):

        def control():
            group.broadcast_counts([1, 1])
            group.any_busy(True)
            group.all_gather_ints([1] * 8)

        out[(0, name, "control")] = _timed(control, iters)
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="own", choices=["own", "all"], help="own: one core per rank; all: shared")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    world = 2
    cores = sorted(os.sched_getaffinity(0))
    cpus = [[cores[r % len(cores)]] for r in range(world)] if args.bind == "own" and len(cores) >= world else None
    if cpus is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server starts ranks that share cores
    # q/k/v of 1 and 32 decode tokens in SmolLM2-135M's shape (9 + 2 * 3 heads of 64), a
    # 2048-token prefill chunk of it, and an 8 MiB tensor
    width = (9 + 2 * 3) * 64
    sizes = [width, 32 * width, 2048 * width, 4 << 20]
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, f"{tmp}/init", cpus, sizes, args.iters, dtype, results), nprocs=world)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {os.cpu_count()} cores, flags {[f for f, on in cpu['flags'].items() if on]}")
    print(f"2 ranks, {'one core each' if cpus else 'sharing every core'}, {args.dtype}, {args.iters} back to back")
    print(f"{'elements':>10} {'KiB':>8} {'what':>12} {'shm us':>9} {'gloo us':>9} {'gloo/shm':>9}")
    for numel, what in [(n, w) for n in sizes for w in ("round trip", "all-reduce")] + [(0, "control")]:
        shm, gloo = results[(numel, "shm", what)], results[(numel, "gloo", what)]
        kib = numel * dtype.itemsize / 1024
        print(f"{numel:>10} {kib:>8.0f} {what:>12} {shm:>9.1f} {gloo:>9.1f} {gloo / shm:>8.1f}x")


if __name__ == "__main__":
    main()
