"""The shared-memory transport (sgl-kernel shm_* ops through ShmGroup) against gloo on the same
tensors, in real processes: point-to-point messages of every size (empty, uneven, many slots),
all-reduce and all-gather in bf16 and fp32 for 2 to 8 ranks, a rank killed mid-transfer, and no
segment left in /dev/shm."""

import os
import time
import uuid

import pytest
import torch
from conftest import run_ranks

pytest.importorskip("sgl_kernel")  # built by `make`; the whole suite needs it on CPU

# small slots, so a few-KB message already spans several of them and wraps the ring
SMALL = dict(slot_bytes=4096, num_slots=2)


def _group(rank, world, init_file, path, spin=100, **layout):
    import torch.distributed as dist
    from sglang.srt.distributed.parallel_state import all_gather_ints
    from sglang.srt.distributed.shm_comm import ShmLayout, open_group

    torch.set_num_threads(1)  # forked from a process whose OpenMP pool must not be reused
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=world, rank=rank)
    group = open_group(
        path, rank, world, lambda f: all_gather_ints(f, world, None), spin=spin, layout=ShmLayout(world, **layout)
    )
    assert group is not None
    return group


def _message(src, dst, numel, dtype):
    g = torch.Generator().manual_seed(1000 * src + dst)
    return (torch.randn(numel, generator=g) * 10).to(dtype)


def _worker(rank, world, init_file, path, sizes, dtype, spin):
    import torch.distributed as dist

    shm = _group(rank, world, init_file, path, spin, **SMALL)
    checked = 0
    for numel in sizes:
        # every rank sends to every other rank, in rank order; receivers take them in the same order
        for src in range(world):
            for dst in range(world):
                if src == dst or rank not in (src, dst):
                    continue
                if rank == src:
                    shm.send(_message(src, dst, numel, dtype), dst)
                else:
                    got = shm.recv_into(torch.empty(numel, dtype=dtype), src)
                    assert torch.equal(got, _message(src, dst, numel, dtype)), (src, dst, numel)
                    checked += 1
        x = _message(rank, rank, numel, dtype)
        gathered = shm.all_gather(x)
        reference = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(reference, x)
        assert torch.equal(gathered, torch.stack(reference)), numel
        summed = x.clone()
        shm.all_reduce(summed)
        exact = sum(_message(r, r, numel, dtype).float() for r in range(world))  # in rank order, in fp32
        assert torch.equal(summed, exact.to(dtype)), numel  # one rounding: the same on every rank
        gloo = x.clone()
        dist.all_reduce(gloo)
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert torch.allclose(summed.float(), gloo.float(), rtol=tol, atol=tol * 10), numel
        checked += 1
    segment_gone = not os.path.exists(path)  # after collectives: rank 0 unlinked it before its first
    dist.destroy_process_group()
    return segment_gone, checked, summed.sum().item()


@pytest.mark.parametrize(
    "world,spin",
    # a negative spin yields the CPU instead of pausing (ranks on lent cores)
    [(2, 100), (3, 100), (8, 100), (3, -100)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transport_matches_gloo(tmp_path, world, spin, dtype):
    path = f"/dev/shm/sglang-tknp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # empty, one element, uneven, exactly a slot, many slots (wraps the 2-slot ring several times)
    sizes = [0, 1, 333, 4096 // dtype.itemsize, 10_000]
    got = run_ranks(_worker, world, world, str(tmp_path / "init"), path, sizes, dtype, spin)
    assert all(gone for gone, _, _ in got.values()), "the segment is unlinked once every rank mapped it"
    assert len({total for _, _, total in got.values()}) == 1, "every rank holds the same all-reduce result"
    assert not os.path.exists(path)


def _late_sender(rank, world, init_file, path):
    import torch.distributed as dist

    shm = _group(rank, world, init_file, path, **SMALL)
    message = torch.arange(10_000, dtype=torch.float32)  # 10 slots through a 2-slot ring
    if rank == 1:
        time.sleep(0.3)  # late: the receiver waits for it
        shm.send(message, 0)
        dist.barrier()
        shm.send(message, 0)  # early: in the ring before the receiver asks
        dist.barrier()
        return None
    start = time.perf_counter()
    assert torch.equal(shm.recv_into(torch.empty(10_000), 1), message)
    late = (shm.waited_seconds, time.perf_counter() - start)
    dist.barrier()
    time.sleep(0.2)  # the sender's first chunk is in; it waits for a free slot for the rest
    waited = shm.waited_seconds
    assert torch.equal(shm.recv_into(torch.empty(10_000), 1), message)
    dist.barrier()
    return late, shm.waited_seconds - waited


def test_recv_tells_waiting_for_the_sender_from_moving_data(tmp_path):
    path = f"/dev/shm/sglang-tknp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (waited, elapsed), early = run_ranks(_late_sender, 2, 2, str(tmp_path / "init"), path)[0]
    assert 0.2 < waited <= elapsed, (waited, elapsed)
    assert early < 0.05, "a message already started costs no wait, though later chunks waited for slots"


def _sleepy_peer(rank, world, init_file, path, spin):
    """Rank 1 sends (and joins an all-reduce) 30 ms after rank 0 started waiting, each time:
    rank 0 has stopped spinning (or yielding) and sleeps on the futex by then. Returns how long
    after rank 1 published rank 0 had its data (time.time() is one clock for both processes)."""
    import torch.distributed as dist

    shm = _group(rank, world, init_file, path, spin)
    late = []
    for i in range(8):
        dist.barrier()
        if rank == 1:
            time.sleep(0.03)
            sent = time.time()
            if i % 2:
                shm.all_reduce(torch.ones(4))
            else:
                shm.send(torch.ones(4), 0)
            late.append(sent)
        else:
            x = torch.ones(4)
            if i % 2:
                shm.all_reduce(x)
            else:
                shm.recv_into(x, 1)
            late.append(time.time())
            assert x.sum().item() in (4.0, 8.0)
    dist.destroy_process_group()
    return late


@pytest.mark.parametrize("spin", [100, -100])
def test_a_sleeping_waiter_is_woken_by_its_peer_not_by_its_timeout(tmp_path, spin):
    # Publishing skips the futex wake while no one sleeps on the word; a waiter must count
    # itself asleep before its last look at the word, or a wake-up is lost and it sleeps on
    # until the 100 ms timeout that checks its peers' pids.
    path = f"/dev/shm/sglang-tknp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    got = run_ranks(_sleepy_peer, 2, 2, str(tmp_path / "init"), path, spin)
    delays = sorted(received - sent for received, sent in zip(got[0], got[1]))
    assert delays[len(delays) // 2] < 0.02, delays  # a lost wake-up costs 70 ms, every time


def _dying_worker(rank, world, init_file, path):
    shm = _group(rank, world, init_file, path)
    if rank == 1:
        time.sleep(0.5)
        os._exit(3)  # dies while rank 0 waits for its message
    start = time.time()
    try:
        shm.recv_into(torch.empty(4), 1)
    except RuntimeError as exc:
        return str(exc), time.time() - start
    return "no error", time.time() - start


def test_a_rank_that_dies_mid_transfer_is_an_error_not_a_hang(tmp_path):
    import multiprocessing as mp

    from conftest import _rank_entry

    path = f"/dev/shm/sglang-tknp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_entry, args=(_dying_worker, r, (2, str(tmp_path / "init"), path), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    rank, ok, (message, waited) = queue.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
    assert rank == 0 and ok
    assert f"peer process {procs[1].pid} is gone" in message
    assert waited < 5
    assert procs[1].exitcode == 3
    assert not os.path.exists(path)


def _control_worker(rank, world, init_file, prefix):
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.distributed.tknp_comm import TknpComm
    from sglang.srt.managers.lockstep import DistLockstepGroup

    torch.set_num_threads(1)
    layout = ps.RankLayout(tknp_size=world)
    state = ps.init_distributed(
        layout, rank, f"file://{init_file}", "gloo", shm_prefix=prefix, local_ranks=range(world)
    )
    try:
        assert state.world_shm is not None and state.tknp_shm is not None
        comm = TknpComm.of(state)
        on_shm = DistLockstepGroup(rank, world, None, state.world_shm)
        on_gloo = DistLockstepGroup(rank, world, None)
        for step in range(3):  # the same answers from both, call after call
            for group in (on_shm, on_gloo):
                assert group.broadcast_counts([10 * rank + step, 7]) == [step, 7]
                assert group.any_busy(rank == world - 1 and step != 1) == (step != 1)
                assert group.all_gather_ints([rank, step]) == [[r, step] for r in range(world)]
            assert comm.all_gather_ints([rank, -step]) == [[r, -step] for r in range(world)]  # the step headers
    finally:
        ps.destroy_distributed()
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_lockstep_and_step_headers_on_shared_memory(tmp_path, world):
    """Ranks on one host run the lockstep's collectives (every rank) and the TKNP step headers on
    shared memory, with gloo's answers; the segments are gone once the ranks have mapped them."""
    prefix = f"sglang-tknp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    assert all(run_ranks(_control_worker, world, world, str(tmp_path / "init"), prefix).values())
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def test_layout_offsets_do_not_overlap():
    from sglang.srt.distributed.shm_comm import ShmLayout

    lay = ShmLayout(4, slot_bytes=128, num_slots=3)
    starts = sorted(lay.channel(s, d) for s in range(4) for d in range(4) if s != d)
    assert starts == [i * lay.channel_bytes for i in range(12)]
    assert lay.collective == 12 * lay.channel_bytes and all(s % 64 == 0 for s in starts)
    assert lay.total_bytes == lay.collective + 4 * (64 + 2 * 128)
