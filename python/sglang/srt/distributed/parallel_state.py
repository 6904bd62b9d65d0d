"""Rank layout and process groups for ExternalDP x TKNP x TP.

Two halves:

- `RankLayout` is pure arithmetic (no torch): which global rank sits at which
  (dp, tknp, tp) coordinate, which ranks form each group, and the start-up checks that need
  the model. TP varies fastest:
      global_rank = (dp * tknp_size + tknp_rank) * tp_size + tp_rank
  A TKNP group is the ranks that share (dp, tp) and differ in tknp_rank; its root is
  tknp_rank 0 (it holds the dense weights; the others hold only their KV pool).

- `init_distributed` creates the torch.distributed process groups once per process and
  returns them in a `ParallelState`, which the caller hands to whatever needs a group.
  Ranks and sizes come from the layout, never from a collective, and an axis of size 1 has
  no group (None), so `--tknp-size 1` runs with no torch.distributed call at all.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from sglang.srt.distributed.shm_comm import ShmGroup

# The axes in layout order, slowest first; TP varies fastest.
_AXES = ("dp", "tknp", "tp")


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the layout."""

    dp: int = 0
    tknp: int = 0
    tp: int = 0


@dataclass(frozen=True)
class RankLayout:
    """ExternalDP x TKNP x TP, TP fastest. Sizes below 1 are rejected at construction."""

    dp_size: int = 1
    tknp_size: int = 1
    tp_size: int = 1

    def __post_init__(self) -> None:
        for axis in _AXES:
            size = self._size(axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"--{axis}-size must be an integer >= 1, got {size!r}")

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tknp_size * self.tp_size

    def _size(self, axis: str) -> int:
        return getattr(self, f"{axis}_size")

    def global_rank(self, coords: RankCoords) -> int:
        rank = 0
        for axis in _AXES:
            index, size = getattr(coords, axis), self._size(axis)
            if not 0 <= index < size:
                raise ValueError(f"{axis} rank {index} out of range for {axis}_size {size}")
            rank = rank * size + index
        return rank

    def coords(self, global_rank: int) -> RankCoords:
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"global rank {global_rank} out of range for world size {self.world_size}")
        indices = {}
        for axis in reversed(_AXES):
            global_rank, indices[axis] = divmod(global_rank, self._size(axis))
        return RankCoords(**indices)

    def _group_ranks(self, axis: str) -> list[list[int]]:
        """The ranks that differ only along `axis`, one list per group, each ordered by that
        axis's rank; groups are ordered by their first member."""
        groups: dict[RankCoords, list[int]] = {}
        for rank in range(self.world_size):
            key = dataclasses.replace(self.coords(rank), **{axis: 0})
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def tknp_group_ranks(self) -> list[list[int]]:
        """One group per (dp, tp), ordered by tknp_rank: the first rank is the root."""
        return self._group_ranks("tknp")

    def tp_group_ranks(self) -> list[list[int]]:
        return self._group_ranks("tp")

    def validate(self, num_attention_heads: int, num_kv_heads: int, num_devices: Optional[int] = None) -> None:
        """Start-up checks, each failing with one line that names the flag.

        `num_devices` is the number of visible accelerators (CUDA); None skips that check (CPU).
        """
        if num_attention_heads % self.tp_size:
            raise ValueError(
                f"--tp-size {self.tp_size} must divide the number of attention heads ({num_attention_heads})"
            )
        if num_kv_heads % self.tp_size:
            raise ValueError(f"--tp-size {self.tp_size} must divide the number of KV heads ({num_kv_heads})")
        if num_devices is not None and self.world_size > num_devices:
            factors = [f"--{axis}-size {self._size(axis)}" for axis in _AXES if self._size(axis) > 1]
            needed = " x ".join(factors or ["--tp-size 1"])
            gpus = "GPU" if self.world_size == 1 else "GPUs"
            raise ValueError(f"{needed} needs {self.world_size} {gpus}, {num_devices} visible")


@dataclass
class ParallelState:
    """This process's place in the layout and the groups it belongs to.

    A group is None when its axis has size 1 (nothing to communicate with). The `*_cpu_group`
    fields are gloo groups over the same ranks for the control plane (small Python objects,
    step metadata); when the main backend is gloo they are the same objects.
    """

    layout: RankLayout
    global_rank: int
    backend: str
    coords: RankCoords = field(init=False)
    tknp_group: Optional[ProcessGroup] = None
    tknp_cpu_group: Optional[ProcessGroup] = None
    tp_group: Optional[ProcessGroup] = None
    tp_cpu_group: Optional[ProcessGroup] = None
    # Every rank, over gloo, for the schedulers' lockstep (counts, has-work flags); None when
    # the default group is already gloo.
    world_cpu_group: Optional[ProcessGroup] = None
    # True when init_distributed called init_process_group, so destroy_distributed tears it down.
    owns_default_group: bool = False
    # Shared-memory transports of this rank's groups, where every rank of the group is on this
    # host (shm_comm.py); the data then moves there instead of on the groups above.
    tknp_shm: Optional["ShmGroup"] = None
    tp_shm: Optional["ShmGroup"] = None
    # Every rank, for the lockstep's small collectives, where every rank is on this host (any
    # backend: they carry CPU ints); they then move off gloo, whose loopback round trip costs
    # about a millisecond per collective, a few percent of a decode step.
    world_shm: Optional["ShmGroup"] = None

    def __post_init__(self) -> None:
        self.coords = self.layout.coords(self.global_rank)


# Kept only so that a second init_distributed fails and destroy_distributed knows what to tear down.
_state: Optional[ParallelState] = None


def init_distributed(
    layout: RankLayout,
    global_rank: int,
    init_method: str,
    backend: str,
    timeout: Optional[datetime.timedelta] = None,
    shm_prefix: Optional[str] = None,
    local_ranks: Sequence[int] = (),
    shm_spin: int = 0,
) -> ParallelState:
    """Join the default process group and create every TP and TKNP group of the layout.

    Every rank must call this with the same layout: torch.distributed requires all ranks to
    call new_group for every group in the same order, even groups they are not in. A world
    of one process creates nothing and makes no torch.distributed call. With `shm_prefix`
    (gloo only), a group whose ranks are all in `local_ranks` (this host's) also gets a
    shared-memory transport, its segment named `<shm_prefix>-<axis><first rank>` in /dev/shm;
    and, when every rank is in `local_ranks` (any backend), the whole world gets a small one for
    the control plane (`world_shm`).
    """
    global _state
    if _state is not None:
        raise RuntimeError("init_distributed called twice; call destroy_distributed first")
    state = ParallelState(layout=layout, global_rank=global_rank, backend=backend)
    if layout.world_size > 1:
        import torch.distributed as dist

        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(
            backend=backend, init_method=init_method, world_size=layout.world_size, rank=global_rank, **kwargs
        )
        state.owns_default_group = True
        if backend != "gloo":
            state.world_cpu_group = dist.new_group(list(range(layout.world_size)), backend="gloo")
        for axis, all_groups in (("tp", layout.tp_group_ranks()), ("tknp", layout.tknp_group_ranks())):
            if len(all_groups[0]) == 1:
                continue  # an axis of size 1: every rank skips it alike, so the order still agrees
            for ranks in all_groups:
                group = dist.new_group(ranks, backend=backend)
                cpu_group = group if backend == "gloo" else dist.new_group(ranks, backend="gloo")
                if global_rank in ranks:
                    setattr(state, f"{axis}_group", group)
                    setattr(state, f"{axis}_cpu_group", cpu_group)
                    if shm_prefix is not None and backend == "gloo" and set(ranks) <= set(local_ranks):
                        shm = _open_shm(shm_prefix, axis, ranks, global_rank, cpu_group, shm_spin)
                        setattr(state, f"{axis}_shm", shm)
        world = list(range(layout.world_size))
        if shm_prefix is not None and set(world) <= set(local_ranks):
            state.world_shm = _open_shm(
                shm_prefix, "world", world, global_rank, state.world_cpu_group, shm_spin, control=True
            )
    _state = state
    return state


def _open_shm(
    prefix: str, axis: str, ranks: list[int], global_rank: int, cpu_group, spin: int, control: bool = False
) -> Optional["ShmGroup"]:
    """`control`: a group for small collectives only, with one small slot per channel."""
    from sglang.srt.distributed.shm_comm import CONTROL_SLOT_BYTES, ShmLayout, open_group, segment_path

    path = segment_path(prefix, f"{axis}{ranks[0]}")
    exchange = lambda fields: all_gather_ints(fields, len(ranks), cpu_group)  # noqa: E731
    layout = ShmLayout(len(ranks), CONTROL_SLOT_BYTES, 1) if control else None
    return open_group(path, ranks.index(global_rank), len(ranks), exchange, spin, layout)


def destroy_distributed() -> None:
    """Tear down what init_distributed created and forget it; a no-op when not initialized."""
    global _state
    state, _state = _state, None
    if state is not None and state.owns_default_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_gather_ints(
    fields: list[int], world_size: int, group: Optional[ProcessGroup], shm: Optional["ShmGroup"] = None
) -> list[list[int]]:
    """Every rank's `fields` (the same length on every rank) in group rank order, on the
    group's shared memory when it has some, else on its gloo group: the small integer exchanges
    of the control plane (step headers, capacities, flags)."""
    import torch
    import torch.distributed as dist

    if shm is not None:
        return shm.all_gather(torch.tensor(fields, dtype=torch.int64)).tolist()
    gathered = [torch.zeros(len(fields), dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor(fields, dtype=torch.int64), group=group)
    return [t.tolist() for t in gathered]
