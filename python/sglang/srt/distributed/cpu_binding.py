"""Which cores each rank on this host runs on (`--cpu-omp-threads-bind`).

On CPU, a rank's speed is its cores' and its NUMA node's memory bandwidth: attention over a long
KV cache is bandwidth-bound, and so are the dense layers at decode. Ranks that share every core
take turns and evict each other's caches; ranks bound to their own cores (on their own node,
where the host has several) run side by side on their own bandwidth. The binding is applied
by the parent as it starts each rank (the child inherits the CPU mask and `OMP_NUM_THREADS`), so
OpenMP sizes and places its threads from the start.

Specs:
- `auto` (default): split the cores this process may use among the host's ranks: whole NUMA
  nodes per rank when there are at least as many nodes as ranks (evenly), else an even share
  of each node's cores per rank when the ranks divide evenly among the nodes, else contiguous
  shares in node order. With fewer cores than ranks, nothing is bound (ranks share, waiting
  passively; see subprocesses.py). TKNP ranks on a single NUMA node are planned by
  ServerArgs.cpu_bindings, which lends each rank's share to its root (`lend_to_roots`).
- `all`: nothing is bound (every rank may run on every core).
- `0-3|4-7|...`: one CPU list per rank on this host, in rank order (SGLang's
  SGLANG_CPU_OMP_THREADS_BIND spelling). Lists may overlap: `0-1|1` lets the first rank run on
  core 1 too, where the second one attends.

A rank's own cores are those of its list that no other rank on the host has. A rank that shares
some of its cores (a TKNP root that borrows its ranks' cores for the dense layers) attends on
its own cores only, and its OpenMP threads are pinned own cores first, so its main thread (the
one that attends and waits for the ranks) never runs on a lent core; a rank with no core of its
own yields its cores to the borrower while it waits (`transport_spin`), and its OpenMP threads
spin only briefly.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_NODE_ROOT = Path("/sys/devices/system/node")
# How long the OpenMP threads of a rank that shares cores with another (a borrowing root, the
# ranks that lend to it) spin after a parallel region before they sleep: long enough to catch
# the next region of their own phase (a dense half's next linear, the next layer's after the
# model's Python), short enough to leave a lent core to the rank that wakes on it as the root's
# dense half ends. On the 2-core Zen 3 host of docs/benchmarks.md, 0.26 ms of spin kept the
# root waiting for its rank 6% of its forward (the rank woke behind the spinning thread) and
# 37-125 us 2-3%; on a 2-core Xeon, with the rank yielding its core while it waits, 37 us
# decoded slightly faster than 75 us and 19 us, and 0.28 ms or none at all clearly slower.
# libgomp's default spins about 30 times as long.
SHARED_CORE_SPIN_SECONDS = 40e-6


@dataclass(frozen=True)
class CpuBinding:
    """One rank's cores (empty: not bound), the NUMA nodes they belong to, and its own cores:
    those no other rank on the host runs on (see the module's docstring)."""

    cpus: tuple[int, ...] = ()
    nodes: tuple[int, ...] = ()
    own: tuple[int, ...] = ()

    @property
    def borrows(self) -> bool:
        """Runs on other ranks' cores too (its dense work), keeping its attention on its own."""
        return 0 < len(self.own) < len(self.cpus)

    @property
    def attention_threads(self) -> Optional[int]:
        """How many threads this rank attends with; None: all of them."""
        return len(self.own) if self.borrows else None

    def describe(self) -> str:
        if not self.cpus:
            return "every core (not bound)"
        nodes = ",".join(map(str, self.nodes))
        text = f"cpus {format_cpu_list(self.cpus)} (NUMA node{'s' if len(self.nodes) > 1 else ''} {nodes})"
        if not self.own:
            text += ", none of them its own (it yields them while it waits)"
        elif self.own != self.cpus:
            text += f", attending on its own {format_cpu_list(self.own)}"
        return text

    def transport_spin(self) -> int:
        """How this rank waits in the shared-memory transport (shm.cpp): spinning where it has
        cores of its own, yielding them first where all of its cores are lent (a negative
        spin), sleeping at once where it is not bound (ranks sharing every core)."""
        from sglang.srt.distributed.shm_comm import LENT_CORE_YIELDS, SPIN_SECONDS

        if self.own:
            return spin_count(SPIN_SECONDS)
        return -LENT_CORE_YIELDS if self.cpus else 0

    def env(self) -> dict[str, str]:
        """What a bound rank's process starts with: one OpenMP thread per core it may run on;
        where it shares cores, threads that spin briefly (unless the user set OpenMP's waiting),
        and for a borrower, pinned own cores first (its main thread on the first)."""
        if not self.cpus:
            return {}
        env = {"OMP_NUM_THREADS": str(len(self.cpus))}
        if self.own != self.cpus and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
            env["GOMP_SPINCOUNT"] = str(shared_core_spin_count())
        if self.borrows:
            lent = [c for c in self.cpus if c not in self.own]
            env["OMP_PROC_BIND"] = "close"
            env["OMP_PLACES"] = ",".join(f"{{{c}}}" for c in list(self.own) + lent)
        return env


@functools.cache
def pause_ns() -> float:
    """How long one spin-wait iteration (a pause) takes on this CPU: 3-70 ns by CPU."""
    try:
        import sgl_kernel
    except ImportError:  # not built: a mid-range pause
        return 25.0
    return max(float(sgl_kernel.ops.spin_pause_ns()), 1.0)


def spin_count(seconds: float) -> int:
    """Pauses that spin for `seconds` on this CPU (libgomp's GOMP_SPINCOUNT and the
    shared-memory transport's waits count pauses, not time)."""
    return max(100, round(seconds * 1e9 / pause_ns()))


def shared_core_spin_count() -> int:
    """GOMP_SPINCOUNT for SHARED_CORE_SPIN_SECONDS on this CPU."""
    return spin_count(SHARED_CORE_SPIN_SECONDS)


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; ValueError on anything else."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 0-3,8")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{text!r}: the range {part.strip()} runs backwards")
        cpus.extend(range(first, last + 1))
    return sorted(set(cpus))


def format_cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def numa_nodes(root: Path = _NODE_ROOT) -> dict[int, list[int]]:
    """NUMA node -> its CPUs, from sysfs; one node holding every online CPU where sysfs has none."""
    nodes = {}
    for path in sorted(root.glob("node[0-9]*")):
        cpulist = path / "cpulist"
        if cpulist.exists() and cpulist.read_text().strip():
            nodes[int(path.name[4:])] = parse_cpu_list(cpulist.read_text())
    return nodes or {0: sorted(os.sched_getaffinity(0))}


def plan_bindings(
    spec: str, num_ranks: int, allowed: Optional[list[int]] = None, nodes: Optional[dict[int, list[int]]] = None
) -> list[CpuBinding]:
    """One binding per rank on this host; ValueError naming the flag for a spec that cannot be
    honoured. `allowed` (this process's CPU mask) and `nodes` default to this host's."""
    allowed = sorted(os.sched_getaffinity(0)) if allowed is None else sorted(allowed)
    nodes = numa_nodes() if nodes is None else nodes
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    if spec == "all":
        shares = []
    elif spec == "auto":
        shares = _auto_shares(num_ranks, allowed, nodes)
    else:
        shares = _explicit_shares(spec, num_ranks, allowed)
    if not shares:
        return [CpuBinding()] * num_ranks
    return _bindings(shares, [{node_of.get(c, 0) for c in share} for share in shares])


def lend_to_roots(bindings: list[CpuBinding], groups: list[list[int]]) -> list[CpuBinding]:
    """`bindings` with the first rank of each group (indices into `bindings`: a TKNP root and its
    ranks) also running on the others' cores. The root runs the dense layers of every rank's
    tokens and the others only attend, so the root borrows their cores while they wait; each
    attends on its own share."""
    if not all(b.cpus for b in bindings):
        return bindings
    shares = [list(b.cpus) for b in bindings]
    nodes = [set(b.nodes) for b in bindings]
    for group in groups:
        shares[group[0]] = sorted({c for member in group for c in bindings[member].cpus})
        nodes[group[0]] = {n for member in group for n in bindings[member].nodes}
    return _bindings(shares, nodes)


def _bindings(shares: list[list[int]], nodes: list[set[int]]) -> list[CpuBinding]:
    """A binding per share; a rank's own cores are those of its share in no other share."""
    holders = Counter(cpu for share in shares for cpu in set(share))
    return [
        CpuBinding(tuple(share), tuple(sorted(node_set)), tuple(c for c in share if holders[c] == 1))
        for share, node_set in zip(shares, nodes)
    ]


def _explicit_shares(spec: str, num_ranks: int, allowed: list[int]) -> list[list[int]]:
    parts = spec.split("|")
    if len(parts) != num_ranks:
        raise ValueError(
            f"--cpu-omp-threads-bind {spec!r} has {len(parts)} CPU lists, but this host runs {num_ranks} ranks "
            "(one list per rank, separated by |)"
        )
    shares = []
    for part in parts:
        try:
            cpus = parse_cpu_list(part)
        except ValueError as exc:
            raise ValueError(f"--cpu-omp-threads-bind: {exc}") from None
        outside = sorted(set(cpus) - set(allowed))
        if outside:
            raise ValueError(
                f"--cpu-omp-threads-bind: CPUs {format_cpu_list(outside)} are not available to this process "
                f"(it may use {format_cpu_list(allowed)})"
            )
        shares.append(cpus)
    return shares


def _auto_shares(num_ranks: int, allowed: list[int], nodes: dict[int, list[int]]) -> list[list[int]]:
    """The cores of each rank, or [] to leave every rank unbound."""
    if num_ranks < 1 or len(allowed) < num_ranks:
        return []
    mask = set(allowed)
    node_cpus = [cpus for _, cpus in sorted(nodes.items())]
    node_cpus = [[c for c in cpus if c in mask] for cpus in node_cpus]
    node_cpus = [cpus for cpus in node_cpus if cpus]
    unplaced = sorted(mask - {c for cpus in node_cpus for c in cpus})
    if unplaced:  # sysfs does not cover the mask: treat what it misses as one more node
        node_cpus.append(unplaced)
    if len(node_cpus) >= num_ranks and len(node_cpus) % num_ranks == 0:
        per = len(node_cpus) // num_ranks
        return [sum(node_cpus[r * per : (r + 1) * per], []) for r in range(num_ranks)]
    if num_ranks % len(node_cpus) == 0:
        per = num_ranks // len(node_cpus)
        if all(len(cpus) >= per for cpus in node_cpus):
            return [share for cpus in node_cpus for share in _split(cpus, per)]
    return _split([c for cpus in node_cpus for c in cpus], num_ranks)


def _split(cpus: list[int], parts: int) -> list[list[int]]:
    """`cpus` in `parts` contiguous shares, sizes differing by at most one (larger first)."""
    base, extra = divmod(len(cpus), parts)
    shares, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        shares.append(cpus[start:end])
        start = end
    return shares
