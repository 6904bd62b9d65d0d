"""Rank layout arithmetic (pure), start-up validation, a one-process world that needs no
torch.distributed, and one real 4-process gloo run (TKNP 2 x TP 2) whose all-reduces prove each
group's membership."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from sglang.srt.distributed import parallel_state as ps
from sglang.srt.distributed.parallel_state import RankCoords, RankLayout

SHAPES = [(1, 1, 1), (1, 2, 1), (1, 3, 1), (1, 2, 2), (2, 2, 2), (1, 4, 2)]  # (dp, tknp, tp)


@pytest.fixture(params=SHAPES, ids=lambda s: "dp%d-tknp%d-tp%d" % s)
def layout(request) -> RankLayout:
    dp, tknp, tp = request.param
    return RankLayout(dp_size=dp, tknp_size=tknp, tp_size=tp)


def test_coords_round_trip(layout: RankLayout):
    assert layout.world_size == layout.dp_size * layout.tknp_size * layout.tp_size
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert layout.global_rank(c) == rank
        assert rank == (c.dp * layout.tknp_size + c.tknp) * layout.tp_size + c.tp
    with pytest.raises(ValueError):
        layout.coords(layout.world_size)


@pytest.mark.parametrize("axis", ["tknp", "tp"])
def test_groups_partition_the_world(layout: RankLayout, axis: str):
    groups = getattr(layout, f"{axis}_group_ranks")()
    size = getattr(layout, f"{axis}_size")
    members = [r for g in groups for r in g]
    assert sorted(members) == list(range(layout.world_size))  # covers everyone, each once: disjoint
    assert len(groups) == layout.world_size // size
    for group in groups:
        assert len(group) == size
        coords = [layout.coords(r) for r in group]
        assert [getattr(c, axis) for c in coords] == list(range(size))  # ordered by the axis rank
        assert len({dataclasses.replace(c, **{axis: 0}) for c in coords}) == 1  # differ only along axis


def test_tp_varies_fastest_and_roots(layout: RankLayout):
    if layout.tp_size > 1:
        assert any({0, 1} <= set(g) for g in layout.tp_group_ranks())
        assert not any({0, 1} <= set(g) for g in layout.tknp_group_ranks())
    for group in layout.tknp_group_ranks():  # the root (TKNP rank 0) comes first
        assert [layout.coords(r).tknp for r in group] == list(range(layout.tknp_size))


def test_known_layout_tknp2_tp2():
    layout = RankLayout(tknp_size=2, tp_size=2)
    assert layout.tknp_group_ranks() == [[0, 2], [1, 3]]
    assert layout.tp_group_ranks() == [[0, 1], [2, 3]]
    assert layout.coords(3) == RankCoords(dp=0, tknp=1, tp=1)


def test_validate_accepts_a_good_layout():
    RankLayout(tknp_size=2, tp_size=2).validate(num_attention_heads=8, num_kv_heads=2, num_devices=4)
    RankLayout(tknp_size=4).validate(num_attention_heads=9, num_kv_heads=3, num_devices=None)


@pytest.mark.parametrize(
    "layout_kwargs, heads, kv_heads, devices, message",
    [
        (dict(tp_size=3), 8, 8, None, "--tp-size 3 must divide the number of attention heads (8)"),
        (dict(tp_size=4), 8, 2, None, "--tp-size 4 must divide the number of KV heads (2)"),
        (dict(tknp_size=2, tp_size=2), 8, 2, 1, "--tknp-size 2 x --tp-size 2 needs 4 GPUs, 1 visible"),
    ],
)
def test_validate_errors_name_the_flag(layout_kwargs, heads, kv_heads, devices, message):
    with pytest.raises(ValueError) as info:
        RankLayout(**layout_kwargs).validate(heads, kv_heads, devices)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flag", ["tknp", "tp", "dp"])
def test_sizes_below_one_are_rejected(flag: str):
    with pytest.raises(ValueError, match=f"--{flag}-size must be an integer >= 1"):
        RankLayout(**{f"{flag}_size": 0})


def test_one_process_world_needs_no_torch_distributed(monkeypatch):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed called")

    for name in ("get_rank", "get_world_size", "is_initialized", "new_group", "init_process_group"):
        monkeypatch.setattr(dist, name, forbidden)
    ps.destroy_distributed()
    state = ps.init_distributed(RankLayout(), 0, "file:///nonexistent", "gloo")
    try:
        assert state.coords == RankCoords() and state.layout.world_size == 1
        assert (state.tknp_group, state.tknp_cpu_group, state.tp_group, state.world_cpu_group) == (None,) * 4
        with pytest.raises(RuntimeError, match="called twice"):
            ps.init_distributed(RankLayout(), 0, "file:///nonexistent", "gloo")
    finally:
        ps.destroy_distributed()
    ps.init_distributed(RankLayout(), 0, "file:///nonexistent", "gloo")  # destroy forgot it
    ps.destroy_distributed()


def _tknp2_tp2_worker(rank: int, init_method: str) -> None:
    """Runs in a child process; any failed assertion makes it exit non-zero."""
    import torch
    import torch.distributed as dist

    layout = RankLayout(tknp_size=2, tp_size=2)
    state = ps.init_distributed(layout, rank, init_method, "gloo", timeout=datetime.timedelta(seconds=30))
    try:
        tknp_rank, tp_rank = divmod(rank, 2)
        assert state.coords == RankCoords(tknp=tknp_rank, tp=tp_rank)
        assert state.tknp_cpu_group is state.tknp_group and state.tp_cpu_group is state.tp_group  # gloo: one each
        assert state.world_cpu_group is None  # the default group is already gloo
        # TKNP groups are {0, 2} and {1, 3}; TP groups are {0, 1} and {2, 3}.
        total = torch.tensor([rank])
        dist.all_reduce(total, group=state.tknp_group)
        assert total.item() == {0: 2, 1: 4}[tp_rank], total.item()
        total = torch.tensor([rank])
        dist.all_reduce(total, group=state.tp_group)
        assert total.item() == {0: 1, 1: 5}[tknp_rank], total.item()
    finally:
        ps.destroy_distributed()


@pytest.mark.slow  # four forked ranks on gloo
def test_four_processes_tknp2_tp2(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported torch, so the test takes about a second.
    ctx = mp.get_context("fork")
    init_method = f"file://{tmp_path / 'dist_init'}"
    procs = [ctx.Process(target=_tknp2_tp2_worker, args=(rank, init_method)) for rank in range(4)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
