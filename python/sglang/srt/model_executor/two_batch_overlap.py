"""Two-batch overlap: a TKNP root's dense layers for one micro-batch while its ranks attend the other.

Without it, a decode step on the root is, per layer: the dense half before attention (norm,
q/k/v projection, rotary) for the whole batch, the scatter of q/k/v, a wait while the ranks
attend, the gather, the dense half after (o_proj, norm, MLP). The root idles while the ranks
attend, and the ranks idle while the root computes. With `--enable-two-batch-overlap` the
runner cuts the step's batch into two micro-batches, each holding one half of every rank's
partition, and runs the model on both at once in two threads that take turns (`run`): a
micro-batch runs until it has sent a layer's q/k/v and attended its own rows, then hands the
turn to the other, which runs its dense layers while the ranks attend the first, and so on.

Exactly one thread runs at a time, and the turns come in a fixed order, so each micro-batch's
forward runs the same ops as it would alone, and every rank sees the same messages in the same
order: micro-batch 0's q/k/v of layer l, then micro-batch 1's (tknp_runner.py says which steps
take this path, and how each rank serves it).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

from sglang.srt.distributed.tknp_protocol import StepHeader

T = TypeVar("T")

PassTurn = Callable[[], None]


class _OtherFailed(Exception):
    """Raised in a micro-batch's thread when the other one failed: its messages will never come."""


class _Baton:
    """Whose turn it is, of two threads: each waits on a lock of its own, which the other
    releases to hand it the turn (a lock handoff is the cheapest wake-up Python has, about
    30 us). Only the thread whose turn it is touches the flags. A thread that is done (or
    failed) leaves the turn to the other for good."""

    def __init__(self) -> None:
        self._turns = [threading.Lock(), threading.Lock()]
        for lock in self._turns:
            lock.acquire()  # thread 0 starts with the turn; 1 waits until 0 hands it over
        self._done = [False, False]
        self._failed = False

    def run(self, me: int, body: Callable[[PassTurn], T]) -> T:
        try:
            if me == 1:
                self._wait(me)
            result = body(lambda: self._pass(me))
        except BaseException as e:
            self._finish(me, failed=not isinstance(e, _OtherFailed))
            raise
        self._finish(me, failed=False)
        return result

    def _pass(self, me: int) -> None:
        if self._done[1 - me]:
            return
        self._turns[1 - me].release()
        self._wait(me)

    def _wait(self, me: int) -> None:
        self._turns[me].acquire()
        if self._failed:
            raise _OtherFailed

    def _finish(self, me: int, failed: bool) -> None:
        self._done[me] = True
        self._failed |= failed
        if not self._done[1 - me]:
            self._turns[1 - me].release()


class TwoBatchOverlap:
    """Runs two micro-batches' forwards in turns: the first on the calling thread, the second on
    a worker thread kept for the purpose."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="two-batch-overlap")

    def run(self, first: Callable[[PassTurn], T], second: Callable[[PassTurn], T]) -> tuple[T, T]:
        """Each body gets the function that hands the turn to the other, and returns its result;
        `first` runs first. An exception in either is raised here."""
        baton = _Baton()
        other = self._worker.submit(baton.run, 1, second)
        try:
            mine = baton.run(0, first)
        except _OtherFailed:
            other.result()  # raises the second's own exception
            raise
        return mine, other.result()


def split_decode_step(headers: list[StepHeader], max_rows: Optional[int]) -> Optional[list[int]]:
    """How many requests of each partition (the step's headers, in rank order) the first
    micro-batch takes, the second taking the rest; None when the step runs whole.

    Only decode steps in which every request samples and none scores prompt tokens split, into
    halves of each partition, rounded up on even ranks and down on odd ones so the
    micro-batches stay even when partitions are odd (tknp 2 with one request each: one
    micro-batch per rank). A step whose second micro-batch would be empty, or that would put
    more than `max_rows` of a partition in one micro-batch (None: no limit), runs whole."""
    if not all(h.is_plain_decode for h in headers):
        return None
    firsts = [(h.reqs + (r % 2 == 0)) // 2 for r, h in enumerate(headers)]
    seconds = [h.reqs - n for h, n in zip(headers, firsts)]
    if not sum(firsts) or not sum(seconds):
        return None
    if max_rows is not None and max(firsts + seconds) > max_rows:
        return None
    return firsts
