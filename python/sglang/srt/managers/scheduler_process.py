"""Building a Scheduler, and the loops that run one in its own process behind ZMQ sockets.

Plain loop (--tknp-size 1): drain every message waiting on the input socket, run one scheduler
step when there is work, send the step's outputs to the detokenizer. With nothing to do it
blocks on the socket (with a timeout only to notice a dead parent), so an idle server uses no CPU.

Lockstep loop (more than one rank: --tknp-size and/or --tp-size > 1): every rank must take
part in every forward, so the ranks agree on each iteration. The controller sends each TKNP
rank's messages to all of its TP replicas, then a `Tick` with the cumulative per-TKNP-rank
message counts to global rank 0. Per iteration rank 0 (blocking on its socket when idle)
broadcasts the newest counts; each rank reads its own socket up to its count (blocking: those
messages were sent before the tick), then the ranks all-gather whether any has work and, if one
has, all run one lockstep step. Idle ranks wait inside the broadcast. TP replicas read the same
messages in the same steps, so their schedulers make the same decisions.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
import zmq

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import ParallelState, init_distributed
from sglang.srt.distributed.tknp_comm import TknpComm
from sglang.srt.layers.tensor_parallel import TpGroup
from sglang.srt.managers.io_struct import BatchTokenIDOut, LoadReport, Tick, decode, encode
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.tknp_runner import TknpModelRunner
from sglang.srt.model_loader import load_tokenizer, resolve_model_path
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import configure_logging, kill_with_parent

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
_LOAD_REPORT_INTERVAL_S = 0.02
# What gloo's RuntimeError says when a peer's connection went away.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def load_model_config_and_tokenizer(args: ServerArgs) -> tuple[ModelConfig, Any]:
    """The model's config and tokenizer, per the (resolved) server args; nothing heavy."""
    model_config = ModelConfig.from_path(
        resolve_model_path(args.model_path), args.dtype, args.context_length, args.device
    )
    return model_config, load_tokenizer(model_config.model_path, args.tokenizer_path)


def build_scheduler(
    args: ServerArgs, state: Optional[ParallelState] = None, host_available: Optional[int] = None
) -> tuple[Scheduler, ModelConfig, Any]:
    """The model, its KV memory and a scheduler over them, per the (resolved) server args;
    with `state`, one rank of a TKNP x TP layout (weights on the root's TP ranks only)."""
    model_config, tokenizer = load_model_config_and_tokenizer(args)
    tknp_rank = state.coords.tknp if state is not None else 0
    graph_max_bs = _cuda_graph_max_bs(args)
    runner = ModelRunner(
        model_config,
        device=args.device,
        attention_backend=args.attention_backend,
        mem_fraction_static=args.mem_fraction_static,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
        hold_weights=tknp_rank == 0,
        # CPU ranks share their host's memory; GPU ranks each have their own device
        memory_share=1.0 / args.ranks_per_node if args.device == "cpu" else 1.0,
        available_memory=host_available,
        tp=TpGroup.of(state) if state is not None else TpGroup(),
        page_size=args.page_size,
        # under TKNP a step spans the group's ranks, so the TKNP runner captures the graphs
        cuda_graph_max_bs=graph_max_bs if args.tknp_size == 1 else None,
    )
    forward = runner
    if args.tknp_size > 1:
        forward = TknpModelRunner(runner, TknpComm.of(state, args.device), cuda_graph_max_bs=graph_max_bs)
    scheduler = Scheduler(
        runner,
        tokenizer,
        schedule_policy=args.schedule_policy,
        chunked_prefill_size=args.chunked_prefill_size,
        disable_radix_cache=args.disable_radix_cache,
        forward=forward,
        tknp_rank=tknp_rank,
    )
    return scheduler, model_config, tokenizer


def _cuda_graph_max_bs(args: ServerArgs) -> Optional[int]:
    """The largest decode batch to capture graphs for; None runs every forward eagerly."""
    if args.disable_cuda_graph or args.device != "cuda":
        return None
    return args.cuda_graph_max_bs


def run_scheduler_process(
    args: ServerArgs, ipc: dict[str, str], ready_pipe: Any, global_rank: int = 0, host_available: Optional[int] = None
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
        state = _init_distributed(args, ipc, global_rank) if multi else None
        scheduler, _, _ = build_scheduler(args, state, host_available)
        load = scheduler.get_load()
        ready = {"max_total_num_tokens": load.max_total_num_tokens, "max_running_requests": load.max_running_requests}
        if multi:
            # every rank learns every rank's capacity: node 0 places requests on other nodes' too
            ready["ranks"] = _gather_capacities(state, load)
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
        _lockstep_loop(io, state)
    except RuntimeError as exc:
        if not _peer_gone(exc):
            raise
        # a peer process ended (the server shut down, or a rank on another node died): one line
        logger.debug("lockstep ended", exc_info=True)
        logger.error(
            "scheduler%d: lost contact with the other ranks (%s); exiting", global_rank, str(exc).splitlines()[0]
        )
        sys.exit(1)


def _gather_capacities(state: ParallelState, load: Any) -> list[list[int]]:
    """[max_total_num_tokens, max_running_requests] of every global rank."""
    mine = torch.tensor([load.max_total_num_tokens, load.max_running_requests])
    every = [torch.zeros(2, dtype=torch.int64) for _ in range(state.layout.world_size)]
    dist.all_gather(every, mine, group=state.world_cpu_group)
    return [t.tolist() for t in every]


def _peer_gone(exc: BaseException) -> bool:
    """Whether gloo raised `exc` because a peer's connection went away."""
    return isinstance(exc, RuntimeError) and any(why in str(exc) for why in _PEER_GONE)


def _init_distributed(args: ServerArgs, ipc: dict[str, str], global_rank: int) -> ParallelState:
    """NCCL for the data (activations, q/k/v, logits) on GPUs, one GPU per rank; gloo on CPU and
    for the control plane everywhere."""
    layout = args.rank_layout()
    backend = "gloo"
    if args.device == "cuda":
        # every node numbers its GPUs from 0; check_rank_layout made sure there are enough
        torch.cuda.set_device(global_rank % args.ranks_per_node)
        backend = "nccl"
    # Idle ranks wait inside a collective for as long as the server is idle.
    return init_distributed(layout, global_rank, ipc["dist_init"], backend, timeout=timedelta(days=365))


class _SchedulerIO:
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

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent


def _plain_loop(io: _SchedulerIO) -> None:
    while True:
        if not io.scheduler.has_work() and not io.recv.poll(_IDLE_POLL_MS):
            if not io.parent_alive():
                return
            continue
        while True:
            try:
                msg = decode(io.recv.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            io.handle(msg)
        if io.scheduler.has_work():
            io.step()


def _lockstep_loop(io: _SchedulerIO, state: ParallelState) -> None:
    """Every rank of the layout (TKNP ranks and their TP replicas) in step; see the docstring.
    Global rank 0 (TKNP root, TP rank 0) gets the ticks and leads."""
    consumed = 0  # messages (not ticks) handled from this rank's socket
    early: deque = deque()  # rank 0: messages read while looking for ticks, not yet counted by one
    target = torch.zeros(state.layout.tknp_size, dtype=torch.int64)  # the newest counts, known to rank 0
    leads = state.global_rank == 0
    busy = False
    while True:
        if leads:
            if not busy and not io.recv.poll(_IDLE_POLL_MS):
                if not io.parent_alive():
                    return
                continue
            _read_ahead(io, target, early)
        counts = target.clone()
        dist.broadcast(counts, src=0, group=state.world_cpu_group)
        # Exactly the counted messages, on every rank alike: a TP replica that handled one more
        # request than its peers would schedule a different batch.
        while consumed < int(counts[state.coords.tknp]):
            msg = early.popleft() if early else decode(io.recv.recv())
            if isinstance(msg, Tick):  # only rank 0 gets ticks
                target = torch.maximum(target, torch.tensor(msg.counts))
                continue
            io.handle(msg)
            consumed += 1
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(state.layout.world_size)]
        dist.all_gather(flags, torch.tensor([int(io.scheduler.has_work())]), group=state.world_cpu_group)
        busy = any(int(f) for f in flags)
        if busy:
            io.step(lockstep=True)
        io.report_load(force=not busy)  # going idle: the controller must see the final state


def _read_ahead(io: _SchedulerIO, target: torch.Tensor, early: deque) -> None:
    """Rank 0: reads everything waiting on its socket; ticks raise the target counts, other
    messages wait in `early` until a broadcast count includes them."""
    while True:
        try:
            msg = decode(io.recv.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        if isinstance(msg, Tick):
            target.copy_(torch.maximum(target, torch.tensor(msg.counts)))
        else:
            early.append(msg)


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
