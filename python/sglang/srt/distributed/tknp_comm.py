"""The transport between a TKNP root and its attention ranks.

Everything a TKNP group exchanges goes through `TknpComm`: the step headers, each rank's batch,
the per-layer q/k/v and attention outputs, and the logits (the messages' formats are in
tknp_protocol.py). On CPU, when every rank of the group is on one host, all of it runs on the
shared-memory transport (shm_comm.py); otherwise on torch.distributed: the data on gloo (CPU) or
NCCL (GPUs), the step headers on gloo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from sglang.srt.distributed.parallel_state import all_gather_ints

if TYPE_CHECKING:
    from sglang.srt.distributed.parallel_state import ParallelState
    from sglang.srt.distributed.shm_comm import ShmGroup


class _Sent:
    """A send that has completed (shared memory copies the message before returning)."""

    def wait(self) -> bool:
        return True


_SENT = _Sent()


@dataclass
class TknpComm:
    """The links between a TKNP root and its ranks.

    Data (q/k/v, attention outputs, batches, logits) moves on `group`, in tensors on `device`,
    and the step headers on `cpu_group` (gloo); both on `shm` instead when it is set. Per
    attention layer the scatter/gather uses the collective that suits the backend: NCCL runs
    `all_to_all_single` with split sizes (one launch for every rank, every rank in it, empty
    partitions included); gloo runs point-to-point sends, which let the root overlap its own
    attention with the sends and skip empty partitions. Both modes run on gloo, so tests cover
    the NCCL path's logic on CPU.
    """

    group: Optional[dist.ProcessGroup]
    group_ranks: list[int]  # global ranks, index = tknp_rank; [0] is the root
    tknp_rank: int
    cpu_group: Optional[dist.ProcessGroup]
    device: torch.device
    use_all_to_all: bool
    shm: Optional["ShmGroup"] = None  # point-to-point data on shared memory (CPU, one host)

    @classmethod
    def of(cls, state: "ParallelState", device: str = "cpu", use_all_to_all: Optional[bool] = None) -> "TknpComm":
        """This process's TKNP group: the ranks that share its TP rank (TP rank r of the root
        sends q/k/v of its heads to TP rank r of every attention rank)."""
        ranks = next(g for g in state.layout.tknp_group_ranks() if state.global_rank in g)
        if use_all_to_all is None:
            use_all_to_all = state.backend == "nccl"
        return cls(
            state.tknp_group,
            ranks,
            state.coords.tknp,
            state.tknp_cpu_group,
            torch.device(device),
            use_all_to_all,
            state.tknp_shm,
        )

    @property
    def size(self) -> int:
        return len(self.group_ranks)

    @property
    def is_root(self) -> bool:
        return self.tknp_rank == 0

    @property
    def send_buffer_bytes(self) -> Optional[int]:
        """The largest message `send` leaves to a receiver that is itself sending; None: any
        (gloo's isend returns at once)."""
        return self.shm.layout.ring_bytes if self.shm is not None else None

    def send(self, tensor: torch.Tensor, to: int) -> None:
        if self.shm is not None:
            self.shm.send(tensor, to)
            return
        dist.send(tensor.contiguous(), dst=self.group_ranks[to], group=self.group)

    def isend(self, tensor: torch.Tensor, to: int) -> Any:
        """Starts a send; the returned handle's wait() ends it. On shared memory the message is
        in the peer's ring when this returns (a large one once the peer took all but its tail)."""
        if self.shm is not None:
            self.shm.send(tensor, to)
            return _SENT
        return dist.isend(tensor.contiguous(), dst=self.group_ranks[to], group=self.group)

    @property
    def waited_seconds(self) -> Optional[float]:
        """Time `recv` spent waiting for its peers to start sending, as opposed to moving the
        data (benchmarks); None on gloo, which does not tell the two apart."""
        return self.shm.waited_seconds if self.shm is not None else None

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, frm: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if self.shm is not None:
            return self.shm.recv_into(out, frm)
        dist.recv(out, src=self.group_ranks[frm], group=self.group)
        return out

    def all_to_all_rows(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts), W] out, split by destination rank; [sum(recv_counts), W] back."""
        out = rows.new_empty((sum(recv_counts), rows.shape[1]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def all_gather_ints(self, fields: list[int]) -> list[list[int]]:
        """Every rank's `fields` (the same length on every rank), in rank order."""
        return all_gather_ints(fields, self.size, self.cpu_group, self.shm)
