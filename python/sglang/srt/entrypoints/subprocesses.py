"""The backend processes of a server and their IPC sockets.

One rank: one scheduler and the detokenizer. --tknp-size N x --tp-size M: N * M rank
schedulers (a gloo group; weights on the M TP ranks of TKNP rank 0 only), the controller that
places requests on the TKNP ranks, and the detokenizer. The tokenizer side always talks to the
socket named "scheduler", which the controller owns when there is more than one rank.

`Backend.start` spawns them, waits until each reports ready (or a start-up error, raised here
as one line), and `shutdown` stops them and removes the socket directory. Children also die
with the parent (PR_SET_PDEATHSIG), so a killed server leaves no orphans.

A socket directory is named after its owner (`sglang-tknp-<pid>-<start time>-*`): a server that
was killed (SIGKILL, a crash) cannot remove its own, so every start removes those whose owner
process is gone.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from sglang.srt.distributed.cpu_binding import CpuBinding, format_cpu_list
from sglang.srt.distributed.shm_comm import SEGMENT_DIR
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import device_memory

logger = logging.getLogger(__name__)

# Each backend process's entry point, imported only in that process: the HTTP process never
# loads the model runner, the TKNP runner or the scheduler it starts.
_SCHEDULER = "sglang.srt.managers.scheduler_process:run_scheduler_process"
_DETOKENIZER = "sglang.srt.managers.detokenizer_manager:run_detokenizer_process"
_CONTROLLER = "sglang.srt.managers.tknp_controller:run_tknp_controller_process"


def _run_entry_point(target: str, *args: object) -> None:
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*args)


class BackendStartError(RuntimeError):
    pass


SOCKET_DIR_PREFIX = "sglang-tknp-"


def _process_start_time(pid: int) -> int:
    """When `pid` started, in clock ticks since boot (0 where /proc cannot tell): with the pid it
    names a process, even after the pid was reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return 0


def _owner_alive(pid: int, start_time: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return start_time == 0 or _process_start_time(pid) in (0, start_time)


def make_socket_dir() -> str:
    """A new socket directory for this process, named after it."""
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{pid}-{_process_start_time(pid)}-")


def stale_socket_dirs(parent: Optional[str] = None) -> list[str]:
    """The socket directories (or shared-memory segments) in `parent` (the temp directory)
    whose owner process is gone. Those of other users, and ones not named after an owner, are
    not listed."""
    parent = parent or tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    stale = []
    for name in names:
        owner = name[len(SOCKET_DIR_PREFIX) :].split("-")
        if not name.startswith(SOCKET_DIR_PREFIX) or len(owner) < 3:
            continue
        try:
            pid, start_time = int(owner[0]), int(owner[1])
        except ValueError:
            continue
        path = os.path.join(parent, name)
        try:
            if os.stat(path).st_uid == os.getuid() and not _owner_alive(pid, start_time):
                stale.append(path)
        except OSError:
            continue
    return stale


def remove_stale_socket_dirs(parent: Optional[str] = None) -> list[str]:
    """Removes `stale_socket_dirs(parent)`; returns them."""
    removed = []
    for path in stale_socket_dirs(parent):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                continue
        removed.append(path)
    if removed:
        logger.info("removed %d socket directories or segments left by servers that are gone", len(removed))
    return removed


@contextmanager
def _cpu_mask(cpus: tuple[int, ...]) -> Iterator[None]:
    """This thread bound to `cpus` (nothing changes for none), so that a process started inside
    inherits the mask from its first instruction; the thread's own mask as it was after."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set for the processes spawned inside; the caller's environment as it was after."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def socket_addresses(args: ServerArgs, socket_dir: str) -> dict[str, str]:
    """Where the processes meet. On one node, IPC files in `socket_dir` and a file rendezvous for
    torch.distributed. With --nnodes > 1, what ranks on other nodes reach is on node 0, over
    TCP: the rendezvous at --dist-init-addr, and the sockets node 0's processes bind (detokenizer,
    controller_in, one per rank) on the ports after it."""
    shared = ["detokenizer", "controller_in"] + [f"rank{r}" for r in range(args.world_size)]
    ipc = {name: f"ipc://{socket_dir}/{name}" for name in ["scheduler", "tokenizer"] + shared}
    ipc["dist_init"] = f"file://{socket_dir}/dist_init"
    # shared-memory segments in /dev/shm are named after the socket directory (shm_comm.py)
    ipc["shm_prefix"] = os.path.basename(socket_dir)
    if args.nnodes > 1:
        host, port = args.dist_init_host_port()
        ipc["dist_init"] = f"tcp://{host}:{port}"
        ipc.update({name: f"tcp://{host}:{port + 1 + i}" for i, name in enumerate(shared)})
    return ipc


@dataclass
class Backend:
    args: ServerArgs
    socket_dir: str = ""
    ipc: dict[str, str] = field(default_factory=dict)
    procs: dict[str, mp.Process] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what the scheduler reported when ready
    bindings: list[CpuBinding] = field(default_factory=list)  # this node's ranks' cores

    def start(self) -> "Backend":
        remove_stale_socket_dirs()
        remove_stale_socket_dirs(SEGMENT_DIR)  # segments a crashed start-up left (shm_comm.py)
        self.socket_dir = make_socket_dir()
        self.ipc = socket_addresses(self.args, self.socket_dir)
        try:
            self._start_processes()
        except BaseException:
            self.shutdown()  # leaves no process and no socket directory behind
            raise
        return self

    def _start_processes(self) -> None:
        env = {}
        self.bindings = self.args.cpu_bindings()
        for rank, binding in zip(self.args.node_ranks(), self.bindings):
            if self.args.ranks_per_node > 1:
                logger.info("rank %d runs on %s", rank, binding.describe())
        shared = not all(binding.cpus for binding in self.bindings)
        if shared and self.args.ranks_per_node > 1 and "OMP_WAIT_POLICY" not in os.environ:
            # Ranks sharing a host's cores take turns (the root's dense layers, then every rank's
            # attention): OpenMP threads that spin while their rank waits steal the cores the
            # busy rank needs. Measured on 2 cores (docs/benchmarks.md): 2.2x the decode speed
            # of --tknp-size 2. OpenMP reads it once, when a child starts.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        with _environment(env):
            self._spawn_all()

    def _spawn_all(self) -> None:
        multi = self.args.world_size > 1
        # measured once, before any rank loads weights: ranks on one host split this budget
        available = device_memory(self.args.device)[0] if multi and self.args.device == "cpu" else None
        schedulers = [
            (f"scheduler{r}" if multi else "scheduler", _SCHEDULER, (r, available, binding), binding)
            for r, binding in zip(self.args.node_ranks(), self.bindings)
        ]
        head = self.args.node_rank == 0  # node 0 serves: the detokenizer and controller live there
        infos = self._spawn(schedulers + ([("detokenizer", _DETOKENIZER, (), CpuBinding())] if head else []))
        first = infos[schedulers[0][0]]
        binding = [
            {
                "rank": r,
                "cpus": format_cpu_list(b.cpus) if b.cpus else None,
                # where it attends: all of cpus but those it shares (a TKNP root borrows its ranks')
                "own_cpus": format_cpu_list(b.own) if b.cpus else None,
                "numa_nodes": list(b.nodes),
            }
            for r, b in zip(self.args.node_ranks(), self.bindings)
        ]
        if not multi:
            self.info = {**first, "ranks": [first], "cpu_binding": binding}
            return
        # every rank reported every rank's capacity; TP replicas of a TKNP rank agree on theirs,
        # so count each TKNP rank once (its TP rank 0)
        every = first["ranks"]
        ranks = [
            dict(zip(("max_total_num_tokens", "max_running_requests"), every[group[0]]))
            for group in self.args.rank_layout().tp_group_ranks()
        ]
        if head:
            capacities = [info["max_total_num_tokens"] for info in ranks]
            self._spawn([("controller", _CONTROLLER, (capacities,), CpuBinding())])
        self.info = {
            "max_total_num_tokens": sum(info["max_total_num_tokens"] for info in ranks),
            "max_running_requests": sum(info["max_running_requests"] for info in ranks),
            "ranks": ranks,
            "cpu_binding": binding,  # this node's ranks
            # of the first rank's groups, e.g. {"tknp": "shm", "lockstep": "shm"}
            "transport": first.get("transport", {}),
        }

    def _spawn(self, targets: list) -> dict[str, dict]:
        """Starts processes and waits for each one's ready message."""
        ctx = mp.get_context("spawn")
        pipes = {}
        for name, target, extra, binding in targets:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_run_entry_point,
                args=(target, self.args, self.ipc, writer, *extra),
                name=f"sglang::{name}",
                daemon=True,
            )
            with _environment(binding.env()), _cpu_mask(binding.cpus):
                proc.start()
            writer.close()
            self.procs[name], pipes[name] = proc, reader
        infos = {name: self._wait_ready(name, reader) for name, reader in pipes.items()}
        # a rank that failed because a peer did names the peer: report the peer's own error
        failed = sorted((bool(msg.get("peer_failed")), name) for name, msg in infos.items() if "error" in msg)
        if failed:
            name = failed[0][1]
            raise BackendStartError(f"{name} failed to start: {infos[name]['error']}")
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


def run_other_node(args: ServerArgs) -> int:
    """Node k > 0 of --nnodes: runs this node's ranks, which reach node 0 over TCP, until one of
    them exits (node 0 shut down, or a rank failed) or this process gets SIGTERM or SIGINT."""
    backend = Backend(args).start()
    ranks = args.node_ranks()
    logger.info(
        "node %d: ranks %d..%d running; node 0 (%s) serves", args.node_rank, ranks[0], ranks[-1], args.dist_init_addr
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        while not stop.wait(0.5):
            dead = backend.dead_process()
            if dead is not None:
                logger.error("%s; stopping node %d", dead, args.node_rank)
                code = 1
                break
    finally:
        backend.shutdown()
    return code
