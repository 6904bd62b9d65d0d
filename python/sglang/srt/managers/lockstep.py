"""How the ranks of a multi-rank server agree on every iteration (--tknp-size and/or --tp-size > 1).

Every rank must take part in every forward, so the ranks iterate together. The controller
sends each TKNP rank's messages to all of its TP replicas, then a `Tick` with the cumulative
per-TKNP-rank message counts to global rank 0. Per iteration rank 0 (blocking on its socket when
idle) broadcasts the newest counts; each rank reads its own socket up to its count (blocking:
those messages were sent before the tick), then the ranks agree whether any has work and, if
one has, all run one step. Idle ranks wait inside the broadcast. TP replicas read the same
messages in the same iterations, so their schedulers make the same decisions.

The collectives are a `LockstepGroup` (every rank in a server, on shared memory when they are
all on one host, else gloo; threads in the unit test), the socket and scheduler a `RankIO`, so
the protocol runs without processes in tests.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import torch
import torch.distributed as dist
import zmq

from sglang.srt.distributed.parallel_state import all_gather_ints
from sglang.srt.managers.io_struct import Tick, decode

IDLE_POLL_MS = 1000  # how often an idle leader checks that its parent is alive


class LockstepGroup(Protocol):
    """The collectives of the lockstep, over every rank of the layout."""

    rank: int  # global rank; 0 leads

    def broadcast_counts(self, counts: list[int]) -> list[int]:
        """Rank 0's `counts` on every rank."""
        ...

    def any_busy(self, busy: bool) -> bool:
        """Whether any rank has work."""
        ...


class RankIO(Protocol):
    """One rank's socket and scheduler, as the lockstep drives them."""

    recv: Any  # a zmq PULL socket (poll, recv with or without NOBLOCK)

    def handle(self, msg: Any) -> None: ...

    def has_work(self) -> bool: ...

    def step(self, lockstep: bool) -> None: ...

    def report_load(self, force: bool) -> None: ...

    def parent_alive(self) -> bool: ...


class DistLockstepGroup:
    """Every rank of the layout: on `shm` (shm_comm.ShmGroup) when given, else on a gloo group
    (the default group when it is gloo). An idle rank waits in `broadcast_counts` either way
    without using CPU: gloo blocks on its socket, shared memory sleeps on a futex."""

    def __init__(self, rank: int, world_size: int, group: Any = None, shm: Any = None):
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.shm = shm

    def broadcast_counts(self, counts: list[int]) -> list[int]:
        if self.shm is not None:  # shared memory has no broadcast: everyone's, then rank 0's
            return self.all_gather_ints(counts)[0]
        t = torch.tensor(counts, dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.group)
        return t.tolist()

    def any_busy(self, busy: bool) -> bool:
        return any(row[0] for row in self.all_gather_ints([int(busy)]))

    def all_gather_ints(self, fields: list[int]) -> list[list[int]]:
        """Every rank's `fields`, in global rank order (start-up: every rank's capacity)."""
        return all_gather_ints(fields, self.world_size, self.group, self.shm)


class Lockstep:
    """One rank's side of the protocol; `run` until the parent process is gone."""

    def __init__(
        self, io: RankIO, group: LockstepGroup, tknp_rank: int, tknp_size: int, idle_poll_ms: int = IDLE_POLL_MS
    ):
        self.io = io
        self.group = group
        self.tknp_rank = tknp_rank
        self.idle_poll_ms = idle_poll_ms
        self.consumed = 0  # messages (not ticks) handled from this rank's socket
        self.early: deque = deque()  # rank 0: messages read while looking for ticks, not yet counted by one
        self.target = [0] * tknp_size  # the newest counts, known to rank 0
        self.busy = False

    def run(self) -> None:
        while self.iterate():
            pass

    def iterate(self) -> bool:
        """One iteration; False when the leader, idle, finds its parent gone."""
        if self.group.rank == 0:
            if not self.busy and not self.io.recv.poll(self.idle_poll_ms):
                return self.io.parent_alive()
            self._read_ahead()
        counts = self.group.broadcast_counts(self.target)
        # Exactly the counted messages, on every rank alike: a TP replica that handled one more
        # request than its peers would schedule a different batch.
        while self.consumed < counts[self.tknp_rank]:
            msg = self.early.popleft() if self.early else decode(self.io.recv.recv())
            if isinstance(msg, Tick):  # only rank 0 gets ticks
                self._raise_target(msg)
                continue
            self.io.handle(msg)
            self.consumed += 1
        self.busy = self.group.any_busy(self.io.has_work())
        if self.busy:
            self.io.step(lockstep=True)
        self.io.report_load(force=not self.busy)  # going idle: the controller must see the final state
        return True

    def _read_ahead(self) -> None:
        """Rank 0: reads everything waiting on its socket; ticks raise the target counts, other
        messages wait in `early` until a broadcast count includes them."""
        while True:
            try:
                msg = decode(self.io.recv.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(msg, Tick):
                self._raise_target(msg)
            else:
                self.early.append(msg)

    def _raise_target(self, tick: Tick) -> None:
        # counts are cumulative: a late tick never takes them back
        self.target = [max(a, b) for a, b in zip(self.target, tick.counts)]
