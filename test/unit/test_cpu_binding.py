"""--cpu-omp-threads-bind: CPU lists, NUMA topology from sysfs, and each rank's share of cores."""

import pytest
from sglang.srt.distributed.cpu_binding import (
    SHARED_CORE_SPIN_SECONDS,
    CpuBinding,
    format_cpu_list,
    lend_to_roots,
    numa_nodes,
    parse_cpu_list,
    plan_bindings,
    shared_core_spin_count,
    spin_count,
)
from sglang.srt.distributed.shm_comm import LENT_CORE_YIELDS, SPIN_SECONDS

TWO_NODES = {0: list(range(8)), 1: list(range(8, 16))}
FOUR_NODES = {n: list(range(4 * n, 4 * n + 4)) for n in range(4)}


def cpus(bindings):
    return [format_cpu_list(b.cpus) for b in bindings]


def test_cpu_lists_round_trip():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list(" 5 ") == [5]
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_cpu_list((4,)) == "4"
    for bad in ("", "a", "3-1", "1-", "-2", "1,,2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_numa_nodes_come_from_sysfs(tmp_path):
    for node, cpulist in ((0, "0-3\n"), (1, "4-7\n"), (2, "\n")):  # node 2: memory only
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpulist)
    (tmp_path / "possible").write_text("0-2\n")
    assert numa_nodes(tmp_path) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert list(numa_nodes(tmp_path / "missing")) == [0]  # no sysfs: one node


@pytest.mark.parametrize(
    "ranks, allowed, nodes, expected",
    [
        (2, range(16), TWO_NODES, ["0-7", "8-15"]),  # a node each
        (4, range(16), TWO_NODES, ["0-3", "4-7", "8-11", "12-15"]),  # half a node each
        (2, range(16), FOUR_NODES, ["0-7", "8-15"]),  # two whole nodes each
        (3, range(16), TWO_NODES, ["0-5", "6-10", "11-15"]),  # uneven: contiguous shares
        (2, [0, 1, 8, 9], TWO_NODES, ["0-1", "8-9"]),  # only what the process may use
        (2, [0, 1], {0: [0, 1]}, ["0", "1"]),  # this CI machine's shape
        (1, range(16), TWO_NODES, ["0-15"]),
    ],
)
def test_auto_gives_each_rank_its_own_cores_node_by_node(ranks, allowed, nodes, expected):
    bindings = plan_bindings("auto", ranks, list(allowed), nodes)
    assert cpus(bindings) == expected
    flat = [c for b in bindings for c in b.cpus]
    assert len(flat) == len(set(flat)), "no core is given twice"
    for b in bindings:
        assert b.nodes == tuple(sorted({n for n, cs in nodes.items() for c in b.cpus if c in cs}))
        assert b.own == b.cpus and not b.borrows and b.attention_threads is None
        assert b.env() == {"OMP_NUM_THREADS": str(len(b.cpus))}


def test_fewer_cores_than_ranks_and_all_leave_ranks_unbound():
    assert plan_bindings("auto", 4, [0, 1], {0: [0, 1]}) == [CpuBinding()] * 4
    assert plan_bindings("all", 2, list(range(16)), TWO_NODES) == [CpuBinding()] * 2
    assert CpuBinding().env() == {} and "not bound" in CpuBinding().describe()


def test_explicit_lists_are_taken_as_given_and_checked():
    assert cpus(plan_bindings("0-3|8-11", 2, list(range(16)), TWO_NODES)) == ["0-3", "8-11"]
    assert plan_bindings("0-3|8-11", 2, list(range(16)), TWO_NODES)[1].describe() == "cpus 8-11 (NUMA node 1)"
    with pytest.raises(ValueError, match="has 2 CPU lists, but this host runs 3 ranks"):
        plan_bindings("0|1", 3, [0, 1, 2], {0: [0, 1, 2]})
    with pytest.raises(ValueError, match="CPUs 4 are not available to this process"):
        plan_bindings("0|4", 2, [0, 1], {0: [0, 1]})
    with pytest.raises(ValueError, match="--cpu-omp-threads-bind: 'x' is not a CPU list"):
        plan_bindings("0|x", 2, [0, 1], {0: [0, 1]})


def test_a_root_borrows_its_ranks_cores_and_attends_on_its_own(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    root, rank = lend_to_roots(plan_bindings("auto", 2, [0, 1], {0: [0, 1]}), [[0, 1]])
    assert (root.cpus, root.own, rank.cpus, rank.own) == ((0, 1), (0,), (1,), ())
    assert root.borrows and root.attention_threads == 1
    assert not rank.borrows and rank.attention_threads is None
    # the root's main thread (place 0) on its own core; its second thread, for dense work, on 1
    assert root.env() == {
        "OMP_NUM_THREADS": "2",
        "OMP_PROC_BIND": "close",
        "OMP_PLACES": "{0},{1}",
        "GOMP_SPINCOUNT": str(shared_core_spin_count()),
    }
    assert rank.env() == {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": str(shared_core_spin_count())}
    assert root.describe() == "cpus 0-1 (NUMA node 0), attending on its own 0"
    assert rank.describe() == "cpus 1 (NUMA node 0), none of them its own (it yields them while it waits)"
    # in the transport the root spins on its own core; the rank yields the lent one (shm.cpp)
    assert root.transport_spin() == spin_count(SPIN_SECONDS) and rank.transport_spin() == -LENT_CORE_YIELDS
    assert CpuBinding().transport_spin() == 0  # unbound ranks share every core: they sleep at once
    # an explicit list says the same with overlapping lists; own cores come first in the places
    assert plan_bindings("0-1|1", 2, [0, 1], {0: [0, 1]}) == [root, rank]
    swapped = plan_bindings("0-1|0", 2, [0, 1], {0: [0, 1]})[0]
    assert swapped.own == (1,) and swapped.env()["OMP_PLACES"] == "{1},{0}"
    # the user's own OpenMP waiting wins
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert "GOMP_SPINCOUNT" not in root.env() and "GOMP_SPINCOUNT" not in rank.env()


def test_lending_follows_each_tknp_group(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    # TKNP 2 x TP 2 on 8 cores (TP fastest: ranks 0, 1 are the root's TP ranks): TP rank t of the
    # root borrows the cores of TP rank t of the other TKNP rank
    plan = plan_bindings("auto", 4, list(range(8)), {0: list(range(8))})
    lent = lend_to_roots(plan, [[0, 2], [1, 3]])
    assert cpus(lent) == ["0-1,4-5", "2-3,6-7", "4-5", "6-7"]
    assert [b.own for b in lent] == [(0, 1), (2, 3), (), ()]
    assert [b.attention_threads for b in lent] == [2, 2, None, None]
    # a lender's threads, on cores its root's dense work uses, spin briefly too
    assert all(b.env()["GOMP_SPINCOUNT"] == str(shared_core_spin_count()) for b in lent)
    # unbound ranks (fewer cores than ranks) stay unbound; lists shared whole leave nothing own
    assert lend_to_roots([CpuBinding()] * 2, [[0, 1]]) == [CpuBinding()] * 2
    both = plan_bindings("0-1|0-1", 2, [0, 1], {0: [0, 1]})
    assert [b.own for b in both] == [(), ()] and not any(b.borrows for b in both)


def test_spins_last_their_time_on_this_cpu():
    """libgomp and the transport count pauses, whose latency differs tenfold between CPUs: a
    spin count is this CPU's pauses in its time."""
    import sgl_kernel

    pause_ns = sgl_kernel.ops.spin_pause_ns()
    assert 0 < pause_ns < 1000
    # measured twice (preemption only lengthens a run, and the best of five is kept)
    seconds = shared_core_spin_count() * max(pause_ns, 1.0) * 1e-9
    assert SHARED_CORE_SPIN_SECONDS / 3 < seconds < SHARED_CORE_SPIN_SECONDS * 3
    # the shared-memory transport's spin of a rank with its own cores, likewise
    seconds = spin_count(SPIN_SECONDS) * max(pause_ns, 1.0) * 1e-9
    assert SPIN_SECONDS / 3 < seconds < SPIN_SECONDS * 3
