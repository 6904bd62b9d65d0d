"""Shared-memory transport for the ranks of a group that all run on one host.

gloo over loopback copies every message through the kernel's socket buffers and wakes the
receiver through the network stack; here a message is one copy into a segment every rank maps
and one copy out, with a futex wake (the ops are sgl-kernel's `shm_*`, csrc/shm.cpp, which
also describes the protocol). `ShmGroup` offers what the TKNP and TP layers need: point-to-point
send/recv (the per-layer scatter of q/k/v and gather of attention outputs, the per-step batch
and logits) and all-reduce / all-gather (TP).

The segment is a file in /dev/shm named after the server instance and the group. It exists
only during start-up: once every rank has mapped it, the group's first rank unlinks it, so no
exit, however abrupt, leaves it behind (the mappings live until the last process goes). A
file left by a start-up that crashed in between is removed at the next start like a stale
socket directory (subprocesses.remove_stale_socket_dirs). Every rank must agree on using the
transport: where the segment cannot be created (no /dev/shm, too little room) the group falls
back to gloo, on every rank alike.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SEGMENT_DIR = "/dev/shm"
_LINE = 64
_CHANNEL_HEADER = 2 * _LINE
SLOT_BYTES = 1 << 20
NUM_SLOTS = 4
# The control group (every rank of a server: lockstep counts, has-work flags) moves a few ints.
CONTROL_SLOT_BYTES = 4096
# How long a rank with cores of its own spins before it sleeps on the futex: about what a root's
# dense work of one decode layer takes at 16 rows, so a rank waiting for the next layer's q/k/v
# mostly catches it spinning (about 6 us), and pays a futex wake (about 0.1 ms in a VM) only
# after longer waits. The ops count pauses, whose latency differs tenfold between CPUs:
# cpu_binding.spin_count converts.
SPIN_SECONDS = 0.5e-3
# How many times a rank whose cores are all lent (a TKNP rank whose core its root's OpenMP
# thread borrows) yields the CPU before it sleeps (passed as a negative spin; see shm.cpp):
# about 0.5 ms on the 2-vCPU VMs of docs/benchmarks.md, where a yield with nothing else to run
# takes 160 ns. There tknp 2 decoded 2-4% faster than with a rank that slept at once; 1,000 to
# 6,000 yields measured the same, 10,000 less well.
LENT_CORE_YIELDS = 3000


@dataclass(frozen=True)
class ShmLayout:
    """Byte offsets in the segment of a group of `world` ranks: a channel per ordered pair of
    ranks, then the collective area."""

    world: int
    slot_bytes: int = SLOT_BYTES
    num_slots: int = NUM_SLOTS

    @property
    def channel_bytes(self) -> int:
        return _CHANNEL_HEADER + self.ring_bytes

    @property
    def ring_bytes(self) -> int:
        """The most a sender can leave in a channel before it waits for its receiver."""
        return self.slot_bytes * self.num_slots

    def channel(self, src: int, dst: int) -> int:
        """Where messages from group rank `src` to `dst` go."""
        index = src * (self.world - 1) + (dst if dst < src else dst - 1)
        return index * self.channel_bytes

    @property
    def collective(self) -> int:
        return self.world * (self.world - 1) * self.channel_bytes

    @property
    def total_bytes(self) -> int:
        return self.collective + self.world * (_LINE + 2 * self.slot_bytes)


class ShmGroup:
    """This rank's view of a group's segment. Every method is called by the ranks it concerns,
    in the same order on each, as with torch.distributed."""

    def __init__(self, segment: torch.Tensor, layout: ShmLayout, rank: int, pids: list[int], spin: int):
        self._ops = _ops()
        self.segment = segment
        self.layout = layout
        self.rank = rank
        self.pids = pids
        self.spin = spin
        # where this rank's messages to and from each peer go (its own entry unused)
        self.send_channels = [layout.channel(rank, p) if p != rank else 0 for p in range(layout.world)]
        self.recv_channels = [layout.channel(p, rank) if p != rank else 0 for p in range(layout.world)]
        # recv_into's time waiting for its senders to start a message, not moving it (benchmarks)
        self.waited_seconds = 0.0

    @property
    def size(self) -> int:
        return self.layout.world

    def send(self, tensor: torch.Tensor, to: int) -> None:
        lay = self.layout
        self._ops.shm_send(
            self.segment, self.send_channels[to], lay.slot_bytes, lay.num_slots, tensor.contiguous(), self.pids[to],
            self.spin,
        )  # fmt: skip

    def recv_into(self, out: torch.Tensor, frm: int) -> torch.Tensor:
        lay = self.layout
        self.waited_seconds += 1e-9 * self._ops.shm_recv(
            self.segment, self.recv_channels[frm], lay.slot_bytes, lay.num_slots, out, self.pids[frm], self.spin
        )
        return out

    def all_reduce(self, x: torch.Tensor) -> None:
        """x = the sum of every rank's x (in rank order, in float32; the same bits on every rank)."""
        if not x.is_contiguous():
            raise ValueError("ShmGroup.all_reduce needs a contiguous tensor")
        lay = self.layout
        self._ops.shm_all_reduce(self.segment, lay.collective, lay.slot_bytes, self.rank, self.pids, x, self.spin)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order."""
        out = x.new_empty((self.size, *x.shape))
        lay = self.layout
        self._ops.shm_all_gather(
            self.segment, lay.collective, lay.slot_bytes, self.rank, self.pids, x.contiguous(), out, self.spin
        )
        return out


def _ops():
    import sgl_kernel

    return sgl_kernel.ops


def segment_path(prefix: str, name: str) -> str:
    return os.path.join(SEGMENT_DIR, f"{prefix}-{name}")


def open_group(
    path: str, rank: int, world: int, exchange, spin: int, layout: Optional[ShmLayout] = None
) -> Optional[ShmGroup]:
    """The group's transport, or None (on every rank alike) where shared memory cannot serve it.

    `exchange(fields)` all-gathers a list of ints over the group's control plane (gloo) and
    returns every rank's list in rank order; it is the only synchronisation used here."""
    layout = layout or ShmLayout(world)
    fd, error = None, ""
    if rank == 0:
        fd, error = _create(path, layout.total_bytes)
    created = exchange([fd is not None, os.getpid()])
    pids = [fields[1] for fields in created]
    if not created[0][0]:
        if rank == 0:
            logger.warning("shared-memory transport unavailable (%s); using gloo", error)
        return None
    if rank != 0:
        fd, error = _open(path)
    mapped = None
    if fd is not None:
        try:
            mapped = mmap.mmap(fd, layout.total_bytes)
        except (OSError, ValueError) as exc:
            error = str(exc)
        finally:
            os.close(fd)
    agreed = all(fields[0] for fields in exchange([mapped is not None]))
    if rank == 0:
        _unlink(path)  # every rank holds its mapping now (or gave up): the name is no longer needed
    if not agreed:
        if mapped is not None:
            mapped.close()
        if rank == 0 or mapped is None:
            logger.warning("shared-memory transport unavailable (%s); using gloo", error or "a peer could not map it")
        return None
    segment = torch.frombuffer(mapped, dtype=torch.uint8)
    return ShmGroup(segment, layout, rank, pids, spin)


def _create(path: str, size: int) -> tuple[Optional[int], str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return None, f"cannot create {path}: {exc.strerror}"
    try:
        # reserve the pages now: on a full /dev/shm a later write would be a SIGBUS
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        _unlink(path)
        return None, f"cannot reserve {size >> 20} MiB in {SEGMENT_DIR}: {exc.strerror}"
    return fd, ""


def _open(path: str) -> tuple[Optional[int], str]:
    try:
        return os.open(path, os.O_RDWR), ""
    except OSError as exc:
        return None, f"cannot open {path}: {exc.strerror}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
