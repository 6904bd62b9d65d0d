"""A scheduler's process: its sockets, and the loop that runs the scheduler behind them.

Plain loop (--tknp-size 1): drain every message waiting on the input socket, run one scheduler
step when there is work, send the step's outputs to the detokenizer. With nothing to do it
blocks on the socket (with a timeout only to notice a dead parent), so an idle server uses no CPU.

With more than one rank (--tknp-size and/or --tp-size > 1) the ranks iterate together, by the
protocol in lockstep.py; building the scheduler is scheduler_builder.py's.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Optional

import zmq

from sglang.srt.distributed.cpu_binding import CpuBinding
from sglang.srt.managers.io_struct import BatchTokenIDOut, LoadReport, decode, encode
from sglang.srt.managers.lockstep import IDLE_POLL_MS, DistLockstepGroup, Lockstep
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.scheduler_builder import build_scheduler, init_rank_distributed
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import configure_logging, kill_with_parent

logger = logging.getLogger(__name__)

_LOAD_REPORT_INTERVAL_S = 0.02
# What gloo's RuntimeError says when a peer's connection went away, and the shared-memory
# transport's when a peer process ended (csrc/shm.cpp).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "a rank died during a transfer")


def run_scheduler_process(
    args: ServerArgs,
    ipc: dict[str, str],
    ready_pipe: Any,
    global_rank: int = 0,
    host_available: Optional[int] = None,
    binding: CpuBinding = CpuBinding(),
) -> None:
    """Entry point of a scheduler process; reports readiness (or the start-up error) on ready_pipe.

    With more than one rank (TKNP and/or TP), the rank reads its own socket, fed by the
    controller; only TP rank 0 of each TKNP rank talks back (outputs, replies, load reports):
    its TP peers compute the same steps and would say the same things.
    """
    kill_with_parent()
    multi = args.world_size > 1
    configure_logging(args.log_level, prefix=f"scheduler{global_rank}" if multi else "scheduler")
    try:
        state = init_rank_distributed(args, ipc, global_rank, binding) if multi else None
        scheduler, _, _ = build_scheduler(args, state, host_available, binding.attention_threads)
        load = scheduler.get_load()
        ready = {"max_total_num_tokens": load.max_total_num_tokens, "max_running_requests": load.max_running_requests}
        if multi:
            ready["transport"] = {
                axis: ("shm" if getattr(state, f"{axis}_shm") else state.backend)
                for axis in ("tknp", "tp")
                if getattr(state, f"{axis}_group") is not None
            }
            ready["transport"]["lockstep"] = "shm" if state.world_shm else "gloo"
            group = DistLockstepGroup(global_rank, state.layout.world_size, state.world_cpu_group, state.world_shm)
            # every rank learns every rank's capacity: node 0 places requests on other nodes' too
            ready["ranks"] = group.all_gather_ints([load.max_total_num_tokens, load.max_running_requests])
    except Exception as exc:  # reported to the parent, which prints one line and exits
        # Exiting ends this rank's connections, so peers waiting on it in a collective fail too;
        # theirs is marked, so the parent reports this rank's own error.
        ready_pipe.send({"error": f"{type(exc).__name__}: {exc}", "peer_failed": _peer_gone(exc)})
        return
    speaks = state is None or state.coords.tp == 0
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    if multi:
        recv.connect(ipc[f"rank{global_rank}"])  # the controller binds it, on node 0
    else:
        recv.bind(ipc["scheduler"])
    to_detokenizer = ctx.socket(zmq.PUSH)
    to_detokenizer.connect(ipc["detokenizer"])
    replies = ctx.socket(zmq.PUSH)
    replies.connect(ipc["controller_in"] if multi else ipc["tokenizer"])
    ready_pipe.send(ready)
    io = _SchedulerIO(scheduler, recv, to_detokenizer, replies, _Watchdog(args.watchdog_timeout), speaks)
    if not multi:
        _plain_loop(io)
        return
    try:
        Lockstep(io, group, state.coords.tknp, state.layout.tknp_size).run()
    except RuntimeError as exc:
        if not _peer_gone(exc):
            raise
        # a peer process ended (the server shut down, or a rank on another node died): one line
        logger.debug("lockstep ended", exc_info=True)
        logger.error(
            "scheduler%d: lost contact with the other ranks (%s); exiting", global_rank, str(exc).splitlines()[0]
        )
        sys.exit(1)


def _peer_gone(exc: BaseException) -> bool:
    """Whether gloo or the shared-memory transport raised `exc` because a peer went away."""
    return isinstance(exc, RuntimeError) and any(why in str(exc) for why in _PEER_GONE)


class _SchedulerIO:
    """The scheduler behind its sockets (lockstep.RankIO)."""

    def __init__(
        self, scheduler: Scheduler, recv: Any, to_detokenizer: Any, replies: Any, watchdog: "_Watchdog", speaks: bool
    ):
        self.scheduler, self.recv, self.to_detokenizer, self.replies, self.watchdog = (
            scheduler,
            recv,
            to_detokenizer,
            replies,
            watchdog,
        )
        self.speaks = speaks  # False on TP ranks other than 0: they stay silent
        self.parent = os.getppid()
        self.last_report = 0.0

    def handle(self, msg: Any) -> None:
        reply = self.scheduler.handle(msg)
        if reply is not None and self.speaks:
            self.replies.send(encode(reply))

    def step(self, lockstep: bool = False) -> None:
        with self.watchdog:
            outputs = self.scheduler.step(lockstep)
        if outputs and self.speaks:
            self.to_detokenizer.send(encode(BatchTokenIDOut(outputs)))

    def report_load(self, force: bool = False) -> None:
        """Tells the controller this rank's load, at most every few milliseconds."""
        now = time.monotonic()
        if self.speaks and (force or now - self.last_report > _LOAD_REPORT_INTERVAL_S):
            self.last_report = now
            self.replies.send(encode(LoadReport(self.scheduler.get_load())))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent


def _plain_loop(io: _SchedulerIO) -> None:
    while True:
        if not io.has_work() and not io.recv.poll(IDLE_POLL_MS):
            if not io.parent_alive():
                return
            continue
        while True:
            try:
                msg = decode(io.recv.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            io.handle(msg)
        if io.has_work():
            io.step()


class _Watchdog:
    """Ends the process if one scheduler step runs longer than `timeout` seconds: a stuck
    forward must not hang the server; the HTTP process sees the death and fails requests."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.step_started: float | None = None
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def __enter__(self) -> None:
        self.step_started = time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        self.step_started = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(self.timeout / 4, 5.0))
            started = self.step_started
            if started is not None and time.monotonic() - started > self.timeout:
                logger.error("a scheduler step has run for over %.0f s (--watchdog-timeout); exiting", self.timeout)
                os._exit(1)
