"""One model forward across a TKNP group, seen by every rank as a forward of its own batch.

Every rank calls `TknpModelRunner.forward(local_batch)` in the same step (an empty partition
passes None). The ranks all-gather a small header (tokens, requests, sampling rows, logprob
rows, top-k); non-root ranks send their token ids, positions and row indices to the root; the
root runs the model on the global batch (partitions concatenated in rank order) with
`TknpAttentionBackend`, while each non-root rank serves the attention of its partition; then the
root sends each rank the logits rows of its own requests. Each rank therefore gets back the
same LogitsProcessorOutput a plain ModelRunner would give for its batch, and samples, appends
and finishes its requests exactly as with --tknp-size 1.

CUDA graphs: a step in which every partition is a plain decode (one token and one sampled row
per request, no input logprobs) of at most `max_bs` requests replays captured graphs. Every rank
pads its partition, empty ones included, to the bucket of the largest partition (all ranks know
it from the headers), so the root's global batch is tknp_size equal partitions and the
scatter/gather has fixed split sizes: the root's graph holds the whole forward with the
collectives inside, each non-root rank's graph its attention loop, and the collectives of the
two pair up on replay as they did on capture. Batches, headers and logits still move eagerly.

Two-batch overlap (`two_batch_overlap`, CPU transports): an eager decode step runs as two
micro-batches, each holding half of every partition; the root's two forwards take turns
(two_batch_overlap.py), and each rank attends its two halves in turn per layer.

The messages' formats are in distributed/tknp_protocol.py, the transport in tknp_comm.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Optional

import torch

from sglang.srt.distributed.tknp_comm import TknpComm
from sglang.srt.distributed.tknp_protocol import (
    LogitsRows,
    StepHeader,
    pack_batch,
    pack_logits,
    qkv_width,
    unpack_batch,
    unpack_logits,
)
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.tknp_attention import TknpAttentionBackend, serve_attention_layers
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner, GraphCapturer, graph_max_bs
from sglang.srt.model_executor.forward_batch import ForwardBatch, TknpPartitions
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.two_batch_overlap import PassTurn, TwoBatchOverlap, split_decode_step


class TknpModelRunner:
    def __init__(
        self,
        runner: ModelRunner,
        comm: TknpComm,
        cuda_graph_max_bs: Optional[int] = None,
        graphs: Optional[GraphCapturer] = None,
        two_batch_overlap: bool = False,
        attention_threads: Optional[int] = None,
    ):
        """`runner` must run eagerly (its own graphs would capture a forward of one rank);
        `cuda_graph_max_bs` and `graphs` are what ModelRunner takes, for the group's graphs.
        `two_batch_overlap` (point-to-point transports only) runs eager decode steps in two
        micro-batches (two_batch_overlap.py). `attention_threads`: the root's own attention, and
        its work between forwards, run on that many threads (its own cores, when it borrows its
        ranks' cores for the dense layers)."""
        assert runner.hold_weights == comm.is_root, "exactly the TKNP root holds the weights"
        assert runner.cuda_graph_runner is None, "under TKNP the TKNP runner captures the graphs"
        assert not (two_batch_overlap and comm.use_all_to_all), "two-batch overlap sends point to point"
        self.runner = runner
        self.comm = comm
        self.layers = runner.attention_layers
        self.vocab_size = runner.model_config.vocab_size
        self._forward_threads = None
        if comm.is_root:
            self.tknp_backend = TknpAttentionBackend(runner.attn_backend, comm, attention_threads)
            if attention_threads is not None:
                # A root that borrows its ranks' cores runs only its forward's dense work there:
                # between forwards (scheduling, sampling) it keeps to its own cores, as in its
                # attention, while each rank does the same work of its own on the lent ones.
                self._forward_threads = torch.get_num_threads()
                torch.set_num_threads(attention_threads)
        self.two_batch_overlap = two_batch_overlap
        self._overlap = TwoBatchOverlap() if two_batch_overlap and comm.is_root else None
        self._rank_wait_seconds = 0.0
        self.overlapped_steps = 0  # root only: steps run as two micro-batches (load reports)
        # bytes of one token's q/k/v message, the largest message of an overlapped step
        self._qkv_bytes = (
            max((qkv_width(a.num_heads, a.num_kv_heads, a.head_dim) for a in self.layers), default=0)
            * torch.empty((), dtype=runner.compute_dtype).element_size()
        )
        self.graph_runner = self._init_graphs(cuda_graph_max_bs, graphs)

    @property
    def comm_seconds(self) -> float:
        """Root only: time its attention spent on scatter/gather, including waiting for ranks."""
        return self.tknp_backend.comm_seconds if self.comm.is_root else 0.0

    @property
    def wait_seconds(self) -> float:
        """Time the attention exchange waited for peers to start sending (shared memory only):
        on the root for the ranks' outputs (part of comm_seconds), on a rank for its q/k/v."""
        return self.tknp_backend.wait_seconds if self.comm.is_root else self._rank_wait_seconds

    def __call__(self, local: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        return self.forward(local)

    def forward(self, local: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        """This rank's logits; None when its partition is empty this step."""
        if local is not None:
            self.runner.attach(local)
        headers = [StepHeader.unpack(f) for f in self.comm.all_gather_ints(StepHeader.of(local).pack())]
        if all(h.tokens == 0 for h in headers):
            return None
        size = self._graph_bucket(headers)
        firsts = self._micro_batches(headers) if size is None else None
        if self.comm.is_root:
            with self._borrowed_cores():
                if firsts is not None:
                    self.overlapped_steps += 1
                    return self._root_overlapped(local, headers, firsts)
                return self._root_forward(local, headers, size)
        return self._rank_forward(local, headers[self.comm.tknp_rank], size, firsts)

    @contextmanager
    def _borrowed_cores(self) -> Iterator[None]:
        """The root's forward runs on every core it may use (see __init__)."""
        if self._forward_threads is None:
            yield
            return
        own = torch.get_num_threads()
        torch.set_num_threads(self._forward_threads)
        try:
            yield
        finally:
            torch.set_num_threads(own)

    def _micro_batches(self, headers: list[StepHeader]) -> Optional[list[int]]:
        """Under two-batch overlap, how many requests of each partition the first micro-batch
        takes; None when this step runs as one batch. The same on every rank (headers only).
        An overlapped root sends one micro-batch's next q/k/v while a rank sends back its
        output for the other, so each message must fit in what a send leaves unread."""
        if not self.two_batch_overlap:
            return None
        limit = self.comm.send_buffer_bytes
        return split_decode_step(headers, None if limit is None else limit // max(self._qkv_bytes, 1))

    # ---- CUDA graphs ---------------------------------------------------------------------

    def _init_graphs(self, max_bs: Optional[int], graphs: Optional[GraphCapturer]) -> Optional[CudaGraphRunner]:
        """The same decision on every rank: the flags and backend are the group's, and the
        largest bucket is agreed on (a partition holds at most its own rank's running requests,
        and the largest partition sets the step's bucket)."""
        if max_bs is None or (graphs is None and self.comm.device.type != "cuda"):
            return None
        runner = self.runner
        most_running = max(f[0] for f in self.comm.all_gather_ints([runner.plan.max_running_requests]))
        max_bs = graph_max_bs(max_bs, runner.attn_backend, most_running)
        if max_bs is None:
            return None
        if self.comm.is_root:
            rows = self.comm.size * max_bs
            device = self.comm.device
            # the global batch's static inputs: partition r fills rows [r * bs, (r + 1) * bs)
            self._ids, self._positions = (torch.zeros(rows, dtype=torch.int64, device=device) for _ in range(2))
            # the global batch's lengths: only its partitions' owners attend, over their own
            # lengths, and the dense layers never read these
            self._ones = torch.ones(rows, dtype=torch.int64, device=device)
            self._rows = torch.arange(rows, device=device)
            body = self._root_graph_body
        else:
            body = lambda batch: serve_attention_layers(  # noqa: E731
                runner.attn_backend, self.layers, [batch], self.comm, runner.compute_dtype
            )
        graph_runner = CudaGraphRunner(
            body, runner.attn_backend, runner.req_to_token_pool, runner.kv_pool, max_bs, graphs
        )
        if self.comm.is_root:
            self.tknp_backend.reset_timers()  # the captures' runs are not steps
        return graph_runner

    def _graph_bucket(self, headers: list[StepHeader]) -> Optional[int]:
        """The bucket every partition pads to when this step replays graphs, else None."""
        if self.graph_runner is None or not all(h.is_plain_decode for h in headers):
            return None
        return self.graph_runner.bucket(max(h.reqs for h in headers))

    def _root_graph_body(self, local: ForwardBatch) -> LogitsProcessorOutput:
        """The root's forward of tknp_size partitions of `local.batch_size` rows each; the
        graph runner has built the inner backend's metadata for `local`."""
        bs = local.batch_size
        rows = self.comm.size * bs
        # only the partitions' owners attend, over their own lengths: the dense layers read none
        global_batch = ForwardBatch.without_kv(
            self._ids[:rows],
            self._positions[:rows],
            self._ones[:rows],
            [1] * rows,
            [1] * rows,
            self._rows[:rows],
            attn_backend=self.tknp_backend,
            tknp_partitions=TknpPartitions([bs] * self.comm.size, local),
        )
        return self.runner.model(global_batch.input_ids, global_batch.positions, global_batch)

    def _replay_root(self, batches: list[Optional[ForwardBatch]], size: int) -> LogitsProcessorOutput:
        rows = self.comm.size * size
        ids, positions = self._ids[:rows], self._positions[:rows]
        ids.zero_()  # padding rows: token 0 at position 0, as every rank pads its own
        positions.zero_()
        samples = []
        for r, batch in enumerate(batches):
            if batch is not None:
                start = r * size
                ids[start : start + batch.batch_size].copy_(batch.input_ids)
                positions[start : start + batch.batch_size].copy_(batch.positions)
                samples.append(batch.sample_indices + start)
        logits = self.graph_runner.replay(batches[0], size).next_token_logits
        return LogitsProcessorOutput(next_token_logits=logits[torch.cat(samples)])  # a copy

    # ---- non-root ranks ------------------------------------------------------------------

    def _rank_forward(
        self, local: Optional[ForwardBatch], h: StepHeader, size: Optional[int], firsts: Optional[list[int]]
    ) -> Optional[LogitsProcessorOutput]:
        if local is not None:
            self.comm.send(pack_batch(local), 0)
        backend = self.runner.attn_backend
        if size is not None:  # an empty partition replays too: the graphs hold collectives
            self.graph_runner.replay(local, size)
        elif local is not None or self.comm.use_all_to_all:  # all_to_all: every rank joins every layer
            batches = [local]
            if firsts is not None:  # the halves the root's two micro-batches hold, in their order
                batches = _halves(local, firsts[self.comm.tknp_rank])
            for batch in batches:
                if batch is not None:
                    backend.init_forward_metadata(batch)
            waited = self.comm.waited_seconds
            serve_attention_layers(backend, self.layers, batches, self.comm, self.runner.compute_dtype)
            if waited is not None:
                self._rank_wait_seconds += self.comm.waited_seconds - waited
        return self._recv_logits(h) if local is not None else None

    def _recv_logits(self, h: StepHeader) -> LogitsProcessorOutput:
        if not h.logits_len(self.vocab_size):  # a prefill chunk that samples nothing: no message
            return LogitsProcessorOutput(next_token_logits=torch.empty(0, self.vocab_size))
        floats = self.comm.recv((h.logits_len(self.vocab_size),), torch.float32, 0)
        top_ids = self.comm.recv((h.logprobs, h.top_k), torch.int64, 0) if h.logprobs and h.top_k else None
        return LogitsProcessorOutput(*unpack_logits(floats, top_ids, h, self.vocab_size))

    # ---- the root ------------------------------------------------------------------------

    def _root_forward(
        self, local: Optional[ForwardBatch], headers: list[StepHeader], size: Optional[int]
    ) -> Optional[LogitsProcessorOutput]:
        batches = [local] + self._recv_batches(headers)
        if size is not None:
            return self._scatter_logits(self._replay_root(batches, size), headers)
        return self._scatter_logits(self._run_partitions(batches), headers)

    def _root_overlapped(
        self, local: Optional[ForwardBatch], headers: list[StepHeader], firsts: list[int]
    ) -> Optional[LogitsProcessorOutput]:
        """A decode step as two micro-batches whose forwards take turns (two_batch_overlap.py)."""
        batches = [local] + self._recv_batches(headers)
        micro = list(zip(*(_halves(b, n) for b, n in zip(batches, firsts))))  # [2][rank]

        def forward(parts: list[Optional[ForwardBatch]], pass_turn: PassTurn) -> tuple[torch.Tensor, ...]:
            logits = self._run_partitions(parts, pass_turn).next_token_logits
            return logits.split([b.batch_size if b is not None else 0 for b in parts])

        first, second = self._overlap.run(partial(forward, micro[0]), partial(forward, micro[1]))
        # each partition's rows: its first half's, then its second's
        logits = torch.cat([rows for pair in zip(first, second) for rows in pair])
        return self._scatter_logits(LogitsProcessorOutput(next_token_logits=logits), headers)

    def _run_partitions(
        self, parts: list[Optional[ForwardBatch]], pass_turn: Optional[PassTurn] = None
    ) -> LogitsProcessorOutput:
        """The model on the global batch of the ranks' partitions (None: empty), in rank order."""
        batch = _concat([b for b in parts if b is not None])
        batch.attn_backend = self.tknp_backend
        sizes = [b.input_ids.numel() if b is not None else 0 for b in parts]
        batch.tknp_partitions = TknpPartitions(sizes, parts[0], pass_turn)
        self.tknp_backend.init_forward_metadata(batch)
        return self.runner.model(batch.input_ids, batch.positions, batch)

    def _recv_batches(self, headers: list[StepHeader]) -> list[Optional[ForwardBatch]]:
        """The non-root ranks' partitions, in rank order (None for an empty one)."""
        return [
            unpack_batch(self.comm.recv((h.batch_len(),), torch.int64, r), h) if h.tokens else None
            for r, h in enumerate(headers)
            if r > 0
        ]

    def _scatter_logits(self, out: LogitsProcessorOutput, headers: list[StepHeader]) -> Optional[LogitsProcessorOutput]:
        """Sends each rank the rows of its own requests; returns the root's."""
        logits = out.next_token_logits.split([h.samples for h in headers])
        n_lp = [h.logprobs for h in headers]
        lps = out.input_token_logprobs.split(n_lp) if out.input_token_logprobs is not None else None
        tops = [x.split(n_lp) for x in out.input_top_logprobs] if out.input_top_logprobs is not None else None
        mine = None
        for r, h in enumerate(headers):
            if h.tokens == 0:
                continue
            part = LogitsRows(logits[r])
            if h.logprobs:
                top = (tops[0][r][:, : h.top_k], tops[1][r][:, : h.top_k]) if h.top_k else None
                part = LogitsRows(logits[r], lps[r], top)
            if r == 0:
                mine = LogitsProcessorOutput(*part)
            elif h.logits_len(self.vocab_size):
                floats, top_ids = pack_logits(part)
                self.comm.send(floats, r)
                if top_ids is not None:
                    self.comm.send(top_ids, r)
        return mine


def _halves(batch: Optional[ForwardBatch], first: int) -> tuple[Optional[ForwardBatch], Optional[ForwardBatch]]:
    """A partition's share of the two micro-batches: its first `first` requests, and the rest."""
    if batch is None:
        return None, None
    return batch.decode_rows(0, first), batch.decode_rows(first, batch.batch_size)


def _concat(batches: list[ForwardBatch]) -> ForwardBatch:
    """The global batch: partitions one after another, row indices shifted to global rows."""
    offsets, total = [], 0
    for b in batches:
        offsets.append(total)
        total += b.input_ids.numel()
    cat = torch.cat
    has_lp = any(b.logprob_indices is not None for b in batches)
    lp_idx = [b.logprob_indices + off for b, off in zip(batches, offsets) if b.logprob_indices is not None]
    lp_tgt = [b.logprob_target_ids for b in batches if b.logprob_target_ids is not None]
    return ForwardBatch.without_kv(
        cat([b.input_ids for b in batches]),
        cat([b.positions for b in batches]),
        cat([b.seq_lens for b in batches]),
        [s for b in batches for s in b.seq_lens_cpu],
        [n for b in batches for n in b.extend_lens],
        cat([b.sample_indices + off for b, off in zip(batches, offsets)]),
        logprob_indices=cat(lp_idx) if has_lp else None,
        logprob_target_ids=cat(lp_tgt) if has_lp else None,
        input_top_logprobs_num=max(b.input_top_logprobs_num for b in batches),
    )
