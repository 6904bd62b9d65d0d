"""The lockstep protocol (managers/lockstep.py) over in-process fakes: four ranks (TKNP 2 x TP 2)
as threads, a socket per rank, the controller's sends and ticks from the test. No processes, no
torch.distributed: the collectives are barriers. Checks what the protocol promises whatever the
threads' timing: every rank handles exactly its messages, TP replicas handle the same messages
between the same steps, every rank steps in every busy iteration, and nothing uncounted by a
tick is handled."""

import threading
import time
from collections import deque

import zmq
from sglang.srt.managers.io_struct import AbortReq, Tick, encode
from sglang.srt.managers.lockstep import Lockstep

TKNP, TP = 2, 2


class FakeSocket:
    """A PULL socket: poll with a timeout, recv blocking or NOBLOCK."""

    def __init__(self):
        self.items: deque = deque()
        self.cond = threading.Condition()

    def push(self, data: bytes) -> None:
        with self.cond:
            self.items.append(data)
            self.cond.notify_all()

    def poll(self, timeout_ms: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.items, timeout_ms / 1000)

    def recv(self, flags: int = 0) -> bytes:
        with self.cond:
            if not self.items:
                if flags & zmq.NOBLOCK:
                    raise zmq.Again()
                self.cond.wait_for(lambda: self.items)
            return self.items.popleft()


class ThreadGroup:
    """The lockstep's collectives for ranks that are threads of this process."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.counts: list[int] = []
        self.flags = [False] * size

    def member(self, rank: int) -> "Member":
        return Member(self, rank)


class Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank

    def broadcast_counts(self, counts):
        if self.rank == 0:
            self.group.counts = list(counts)
        self.group.barrier.wait()
        out = list(self.group.counts)
        self.group.barrier.wait()
        return out

    def any_busy(self, busy):
        self.group.flags[self.rank] = busy
        self.group.barrier.wait()
        out = any(self.group.flags)
        self.group.barrier.wait()
        return out


class FakeRank:
    """A scheduler whose messages are AbortReqs named "<id>:<steps of work>"."""

    def __init__(self, stop: threading.Event):
        self.recv = FakeSocket()
        self.stop = stop
        self.log: list[str] = []  # handled rids and "step", in order
        self.pending = 0
        self.loads = 0

    def handle(self, msg):
        self.log.append(msg.rid)
        self.pending += int(msg.rid.split(":")[1])

    def has_work(self):
        return self.pending > 0

    def step(self, lockstep):
        assert lockstep
        self.log.append("step")
        self.pending = max(self.pending - 1, 0)

    def report_load(self, force):
        self.loads += 1

    def parent_alive(self):
        return not self.stop.is_set()

    def handled(self) -> list[str]:
        return [x for x in self.log if x != "step"]


class Cluster:
    def __init__(self):
        self.stop = threading.Event()
        self.group = ThreadGroup(TKNP * TP)
        self.ranks = [FakeRank(self.stop) for _ in range(TKNP * TP)]  # global rank = tknp * TP + tp
        self.counts = [0] * TKNP
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(g,), daemon=True) for g in range(TKNP * TP)]
        for t in self.threads:
            t.start()

    def _run(self, g: int) -> None:
        lockstep = Lockstep(self.ranks[g], self.group.member(g), g // TP, TKNP, idle_poll_ms=5)
        try:
            lockstep.run()
        except threading.BrokenBarrierError:
            pass  # the test ended while this rank waited for the leader
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def send(self, tknp_rank: int, rid: str, tick: bool = True) -> None:
        """What the controller does: the message to every TP replica, then a tick to rank 0."""
        for tp in range(TP):
            self.ranks[tknp_rank * TP + tp].recv.push(encode(AbortReq(rid)))
        self.counts[tknp_rank] += 1
        if tick:
            self.tick()

    def tick(self) -> None:
        self.ranks[0].recv.push(encode(Tick(list(self.counts))))

    def wait(self, condition, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, [r.log for r in self.ranks]
            time.sleep(0.002)

    def idle_with(self, handled: dict[int, int]) -> bool:
        return all(
            len(self.ranks[t * TP + tp].handled()) == n and not self.ranks[t * TP + tp].pending
            for t, n in handled.items()
            for tp in range(TP)
        )

    def close(self) -> None:
        self.stop.set()
        self.threads[0].join(5)
        self.group.barrier.abort()  # the others wait in the broadcast for a leader that left
        for t in self.threads:
            t.join(5)
        assert not any(t.is_alive() for t in self.threads)
        assert not self.errors, self.errors


def test_ranks_handle_their_messages_and_step_together():
    cluster = Cluster()
    try:
        sent = {0: [], 1: []}
        for i, (rank, work) in enumerate([(0, 3), (1, 1), (1, 4), (0, 1), (0, 2), (1, 2)]):
            rid = f"m{i}:{work}"
            cluster.send(rank, rid)
            sent[rank].append(rid)
            if i % 2:
                time.sleep(0.003)  # some arrive while the ranks step
        cluster.wait(lambda: cluster.idle_with({0: 3, 1: 3}))
    finally:
        cluster.close()
    ranks = cluster.ranks
    for g, rank in enumerate(ranks):
        assert rank.handled() == sent[g // TP], g
    # TP replicas: the same messages between the same steps
    assert ranks[0].log == ranks[1].log and ranks[2].log == ranks[3].log
    # every rank takes part in every step, busy or not
    steps = [r.log.count("step") for r in ranks]
    assert len(set(steps)) == 1 and steps[0] >= 4  # the longest rank's work at least
    assert all(r.loads for r in ranks)


def test_nothing_is_handled_before_a_tick_counts_it():
    cluster = Cluster()
    try:
        cluster.send(0, "early:1", tick=False)  # on rank 0's sockets, not yet counted
        cluster.send(1, "other:3")  # its tick counts both, so make the next tick the first
        cluster.wait(lambda: cluster.idle_with({1: 1}))
        cluster.tick()
        cluster.wait(lambda: cluster.idle_with({0: 1, 1: 1}))
    finally:
        cluster.close()
    assert cluster.ranks[0].log == cluster.ranks[1].log
    assert cluster.ranks[0].handled() == ["early:1"]
