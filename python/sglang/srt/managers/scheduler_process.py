"""Building a Scheduler, and the loop that runs one in its own process behind ZMQ sockets.

The loop drains every message waiting on its input socket, runs one scheduler step when there
is work, and sends the step's outputs to the detokenizer. With nothing to do it blocks on the
socket (with a timeout only to notice a dead parent), so an idle server uses no CPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import zmq

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.io_struct import BatchTokenIDOut, decode, encode
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_loader import load_tokenizer, resolve_model_path
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import configure_logging, kill_with_parent

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000


def build_scheduler(args: ServerArgs) -> tuple[Scheduler, ModelConfig, Any]:
    """The model, its KV memory and a scheduler over them, per the (resolved) server args."""
    model_path = resolve_model_path(args.model_path)
    model_config = ModelConfig.from_path(model_path, args.dtype, args.context_length, args.device)
    tokenizer = load_tokenizer(model_path, args.tokenizer_path)
    runner = ModelRunner(
        model_config,
        device=args.device,
        attention_backend=args.attention_backend,
        mem_fraction_static=args.mem_fraction_static,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
    )
    scheduler = Scheduler(
        runner,
        tokenizer,
        schedule_policy=args.schedule_policy,
        chunked_prefill_size=args.chunked_prefill_size,
        disable_radix_cache=args.disable_radix_cache,
    )
    return scheduler, model_config, tokenizer


def run_scheduler_process(args: ServerArgs, ipc: dict[str, str], ready_pipe: Any) -> None:
    """Entry point of the scheduler process; reports readiness (or the start-up error) on ready_pipe."""
    kill_with_parent()
    configure_logging(args.log_level, prefix="scheduler")
    try:
        scheduler, _, _ = build_scheduler(args)
    except Exception as exc:  # reported to the parent, which prints one line and exits
        ready_pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc["scheduler"])
    to_detokenizer = ctx.socket(zmq.PUSH)
    to_detokenizer.connect(ipc["detokenizer"])
    to_tokenizer = ctx.socket(zmq.PUSH)
    to_tokenizer.connect(ipc["tokenizer"])
    load = scheduler.get_load()
    ready_pipe.send({"max_total_num_tokens": load.max_total_num_tokens, "max_running_requests": load.max_running_requests})
    parent = os.getppid()
    watchdog = _Watchdog(args.watchdog_timeout)
    while True:
        if not scheduler.has_work() and not recv.poll(_IDLE_POLL_MS):
            if os.getppid() != parent:
                return
            continue
        while True:
            try:
                msg = decode(recv.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            reply = scheduler.handle(msg)
            if reply is not None:
                to_tokenizer.send(encode(reply))
        if scheduler.has_work():
            with watchdog:
                outputs = scheduler.step()
            if outputs:
                to_detokenizer.send(encode(BatchTokenIDOut(outputs)))


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
