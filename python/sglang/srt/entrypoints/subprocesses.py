"""The backend processes of a server and their IPC sockets.

One rank: one scheduler and the detokenizer. --tknp-size N x --tp-size M: N * M rank
schedulers (a gloo group; weights on the M TP ranks of TKNP rank 0 only), the controller that
places requests on the TKNP ranks, and the detokenizer. The tokenizer side always talks to the
socket named "scheduler", which the controller owns when there is more than one rank.

`Backend.start` spawns them, waits until each reports ready (or a start-up error, raised here
as one line), and `shutdown` stops them and removes the socket directory. Children also die
with the parent (PR_SET_PDEATHSIG), so a killed server leaves no orphans.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from sglang.srt.managers.detokenizer_manager import run_detokenizer_process
from sglang.srt.managers.scheduler_process import run_scheduler_process
from sglang.srt.managers.tknp_controller import run_tknp_controller_process
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import device_memory


class BackendStartError(RuntimeError):
    pass


@dataclass
class Backend:
    args: ServerArgs
    socket_dir: str = ""
    ipc: dict[str, str] = field(default_factory=dict)
    procs: dict[str, mp.Process] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what the scheduler reported when ready

    def start(self) -> "Backend":
        self.socket_dir = tempfile.mkdtemp(prefix="sglang-tknp-")
        names = ["scheduler", "detokenizer", "tokenizer", "controller_in"] + [f"rank{r}" for r in range(self.args.world_size)]
        self.ipc = {name: f"ipc://{self.socket_dir}/{name}" for name in names}
        self.ipc["dist_init"] = f"file://{self.socket_dir}/dist_init"
        try:
            self._start_processes()
        except BaseException:
            self.shutdown()  # leaves no process and no socket directory behind
            raise
        return self

    def _start_processes(self) -> None:
        multi = self.args.world_size > 1
        # measured once, before any rank loads weights: ranks on one host split this budget
        available = device_memory(self.args.device)[0] if multi and self.args.device == "cpu" else None
        schedulers = [
            (f"scheduler{r}" if multi else "scheduler", run_scheduler_process, (r, available))
            for r in range(self.args.world_size)
        ]
        infos = self._spawn(schedulers + [("detokenizer", run_detokenizer_process, ())])
        # TP replicas of a TKNP rank agree on their capacity; count each TKNP rank once (TP rank 0)
        ranks = [infos[schedulers[group[0]][0]] for group in self.args.rank_layout().tp_group_ranks()]
        if multi:
            capacities = [info["max_total_num_tokens"] for info in ranks]
            self._spawn([("controller", run_tknp_controller_process, (capacities,))])
        self.info = {
            "max_total_num_tokens": sum(info["max_total_num_tokens"] for info in ranks),
            "max_running_requests": sum(info["max_running_requests"] for info in ranks),
            "ranks": ranks,
        }

    def _spawn(self, targets: list) -> dict[str, dict]:
        """Starts processes and waits for each one's ready message."""
        ctx = mp.get_context("spawn")
        pipes = {}
        for name, target, extra in targets:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=target, args=(self.args, self.ipc, writer, *extra), name=f"sglang::{name}", daemon=True)
            proc.start()
            writer.close()
            self.procs[name], pipes[name] = proc, reader
        infos = {}
        for name, reader in pipes.items():
            msg = self._wait_ready(name, reader)
            if "error" in msg:
                raise BackendStartError(f"{name} failed to start: {msg['error']}")
            infos[name] = msg
        return infos

    def _wait_ready(self, name: str, reader) -> dict:
        try:
            return reader.recv()
        except EOFError:
            raise BackendStartError(f"{name} process exited during start-up (code {self.procs[name].exitcode})")

    def dead_process(self) -> Optional[str]:
        """A description of the first backend process that is no longer running, if any."""
        for name, proc in self.procs.items():
            if not proc.is_alive():
                return f"the {name} process died (exit code {proc.exitcode})"
        return None

    def shutdown(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.socket_dir and os.path.isdir(self.socket_dir):
            shutil.rmtree(self.socket_dir, ignore_errors=True)
