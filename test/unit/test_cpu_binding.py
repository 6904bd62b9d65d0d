"""--cpu-omp-threads-bind: CPU lists, NUMA topology from sysfs, and each rank's share of cores."""

import pytest
from sglang.srt.distributed.cpu_binding import (
    CpuBinding,
    format_cpu_list,
    numa_nodes,
    parse_cpu_list,
    plan_bindings,
)

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
