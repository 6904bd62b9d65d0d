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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.tknp_attention import TknpAttentionBackend, TknpComm, serve_attention_layers
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner, GraphCapturer, graph_max_bs
from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang.srt.model_executor.model_runner import ModelRunner


@dataclass
class _Header:
    tokens: int
    reqs: int
    samples: int
    logprobs: int
    top_k: int

    @classmethod
    def of(cls, batch: Optional[ForwardBatch]) -> "_Header":
        if batch is None:
            return cls(0, 0, 0, 0, 0)
        n_lp = 0 if batch.logprob_indices is None else batch.logprob_indices.numel()
        return cls(
            batch.input_ids.numel(), batch.batch_size, batch.sample_indices.numel(), n_lp, batch.input_top_logprobs_num
        )

    def meta_len(self) -> int:
        return 2 * self.tokens + 2 * self.reqs + self.samples + 2 * self.logprobs


class TknpModelRunner:
    def __init__(
        self,
        runner: ModelRunner,
        comm: TknpComm,
        cuda_graph_max_bs: Optional[int] = None,
        graphs: Optional[GraphCapturer] = None,
    ):
        """`runner` must run eagerly (its own graphs would capture a forward of one rank);
        `cuda_graph_max_bs` and `graphs` are what ModelRunner takes, for the group's graphs."""
        assert runner.hold_weights == comm.is_root, "exactly the TKNP root holds the weights"
        assert runner.cuda_graph_runner is None, "under TKNP the TKNP runner captures the graphs"
        self.runner = runner
        self.comm = comm
        self.layers = runner.attention_layers
        self.vocab_size = runner.model_config.vocab_size
        if comm.is_root:
            self.tknp_backend = TknpAttentionBackend(runner.attn_backend, comm)
        self.graph_runner = self._init_graphs(cuda_graph_max_bs, graphs)

    @property
    def comm_seconds(self) -> float:
        """Root only: time its attention spent on scatter/gather, including waiting for ranks."""
        return self.tknp_backend.comm_seconds if self.comm.is_root else 0.0

    def forward(self, local: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        """This rank's logits; None when its partition is empty this step."""
        if local is not None:
            self.runner.attach(local)
        headers = self._exchange_headers(_Header.of(local))
        if all(h.tokens == 0 for h in headers):
            return None
        size = self._graph_bucket(headers)
        if self.comm.is_root:
            return self._root_forward(local, headers, size)
        return self._rank_forward(local, headers[self.comm.tknp_rank], size)

    def _exchange_headers(self, mine: _Header) -> list[_Header]:
        fields = [mine.tokens, mine.reqs, mine.samples, mine.logprobs, mine.top_k]
        return [_Header(*f) for f in self.comm.all_gather_header(fields)]

    # ---- CUDA graphs ---------------------------------------------------------------------

    def _init_graphs(self, max_bs: Optional[int], graphs: Optional[GraphCapturer]) -> Optional[CudaGraphRunner]:
        """The same decision on every rank: the flags and backend are the group's, and the
        largest bucket is agreed on (a partition holds at most its own rank's running requests,
        and the largest partition sets the step's bucket)."""
        if max_bs is None or (graphs is None and self.comm.device.type != "cuda"):
            return None
        runner = self.runner
        most_running = max(f[0] for f in self.comm.all_gather_header([runner.plan.max_running_requests]))
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
            self._nothing = torch.empty(0, dtype=torch.int64, device=device)
            body = self._root_graph_body
        else:
            body = lambda batch: serve_attention_layers(  # noqa: E731
                runner.attn_backend, self.layers, batch, self.comm, runner.compute_dtype
            )
        graph_runner = CudaGraphRunner(
            body, runner.attn_backend, runner.req_to_token_pool, runner.kv_pool, max_bs, graphs
        )
        if self.comm.is_root:
            self.tknp_backend.comm_seconds = 0.0  # the captures' runs are not steps
        return graph_runner

    def _graph_bucket(self, headers: list[_Header]) -> Optional[int]:
        """The bucket every partition pads to when this step replays graphs, else None."""
        if self.graph_runner is None:
            return None
        if any(h.tokens != h.reqs or h.samples != h.reqs or h.logprobs for h in headers):
            return None
        return self.graph_runner.bucket(max(h.reqs for h in headers))

    def _root_graph_body(self, local: ForwardBatch) -> LogitsProcessorOutput:
        """The root's forward of tknp_size partitions of `local.batch_size` rows each."""
        bs = local.batch_size
        rows = self.comm.size * bs
        global_batch = ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=self._ids[:rows],
            positions=self._positions[:rows],
            out_cache_loc=self._nothing,
            req_pool_indices=self._nothing,
            seq_lens=self._ones[:rows],
            seq_lens_cpu=[1] * rows,
            prefix_lens=[0] * rows,
            extend_lens=[1] * rows,
            sample_indices=self._rows[:rows],
            attn_backend=self.tknp_backend,
        )
        self.tknp_backend.begin(local, [bs] * self.comm.size)
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
        self, local: Optional[ForwardBatch], h: _Header, size: Optional[int]
    ) -> Optional[LogitsProcessorOutput]:
        if local is not None:
            device = local.input_ids.device
            parts = [
                local.input_ids,
                local.positions,
                torch.tensor(local.extend_lens, device=device),
                local.seq_lens,
                local.sample_indices,
            ]
            if h.logprobs:
                parts += [local.logprob_indices, local.logprob_target_ids]
            self.comm.send(torch.cat(parts), 0)
        backend = self.runner.attn_backend
        if size is not None:  # an empty partition replays too: the graphs hold collectives
            self.graph_runner.replay(local, size)
        elif local is not None:
            backend.init_forward_metadata(local)
            serve_attention_layers(backend, self.layers, local, self.comm, self.runner.compute_dtype)
        elif self.comm.use_all_to_all:  # every rank joins every layer's all_to_all
            serve_attention_layers(backend, self.layers, None, self.comm, self.runner.compute_dtype)
        return self._recv_logits(h) if local is not None else None

    def _recv_logits(self, h: _Header) -> LogitsProcessorOutput:
        if not (h.samples or h.logprobs):  # a prefill chunk that samples nothing: no message
            return LogitsProcessorOutput(next_token_logits=torch.empty(0, self.vocab_size))
        floats = self.comm.recv((h.samples * self.vocab_size + h.logprobs * (1 + h.top_k),), torch.float32, 0)
        logits, rest = floats.split([h.samples * self.vocab_size, h.logprobs * (1 + h.top_k)])
        out = LogitsProcessorOutput(next_token_logits=logits.view(h.samples, self.vocab_size))
        if h.logprobs:
            lps, top_vals = rest.split([h.logprobs, h.logprobs * h.top_k])
            out.input_token_logprobs = lps
            if h.top_k:
                top_ids = self.comm.recv((h.logprobs, h.top_k), torch.int64, 0)
                out.input_top_logprobs = (top_vals.view(h.logprobs, h.top_k), top_ids)
        return out

    # ---- the root ------------------------------------------------------------------------

    def _root_forward(
        self, local: Optional[ForwardBatch], headers: list[_Header], size: Optional[int]
    ) -> Optional[LogitsProcessorOutput]:
        batches = [local] + [self._recv_batch(r, h) for r, h in enumerate(headers) if r > 0]
        if size is not None:
            return self._scatter_logits(self._replay_root(batches, size), headers)
        global_batch = _concat([b for b in batches if b is not None])
        global_batch.attn_backend = self.tknp_backend
        if local is not None:
            self.runner.attn_backend.init_forward_metadata(local)
        self.tknp_backend.begin(local, [h.tokens for h in headers])
        out = self.runner.model(global_batch.input_ids, global_batch.positions, global_batch)
        return self._scatter_logits(out, headers)

    def _recv_batch(self, r: int, h: _Header) -> Optional[ForwardBatch]:
        if h.tokens == 0:
            return None
        meta = self.comm.recv((h.meta_len(),), torch.int64, r)
        input_ids, positions, extend_lens, seq_lens, samples, lp_idx, lp_tgt = meta.split(
            [h.tokens, h.tokens, h.reqs, h.reqs, h.samples, h.logprobs, h.logprobs]
        )
        extend = extend_lens.tolist()
        seq = seq_lens.tolist()
        return ForwardBatch(
            forward_mode=ForwardMode.of(extend),
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=torch.empty(0, dtype=torch.int64),  # slots live on the owner rank
            req_pool_indices=torch.empty(0, dtype=torch.int64),
            seq_lens=seq_lens,
            seq_lens_cpu=seq,
            prefix_lens=[s - e for s, e in zip(seq, extend)],
            extend_lens=extend,
            sample_indices=samples,
            logprob_indices=lp_idx if h.logprobs else None,
            logprob_target_ids=lp_tgt if h.logprobs else None,
            input_top_logprobs_num=h.top_k,
        )

    def _scatter_logits(self, out: LogitsProcessorOutput, headers: list[_Header]) -> Optional[LogitsProcessorOutput]:
        logits = out.next_token_logits.split([h.samples for h in headers])
        n_lp = [h.logprobs for h in headers]
        lps = out.input_token_logprobs.split(n_lp) if out.input_token_logprobs is not None else None
        tops = [x.split(n_lp) for x in out.input_top_logprobs] if out.input_top_logprobs is not None else None
        mine = None
        for r, h in enumerate(headers):
            if h.tokens == 0:
                continue
            part = LogitsProcessorOutput(next_token_logits=logits[r])
            if h.logprobs:
                part.input_token_logprobs = lps[r]
                if h.top_k:
                    part.input_top_logprobs = (tops[0][r][:, : h.top_k], tops[1][r][:, : h.top_k])
            if r == 0:
                mine = part
            elif h.samples or h.logprobs:
                self._send_logits(part, h, r)
        return mine

    def _send_logits(self, part: LogitsProcessorOutput, h: _Header, r: int) -> None:
        floats = [part.next_token_logits.flatten()]
        if h.logprobs:
            floats.append(part.input_token_logprobs)
            if h.top_k:
                floats.append(part.input_top_logprobs[0].flatten())
        self.comm.send(torch.cat(floats).float(), r)
        if h.logprobs and h.top_k:
            self.comm.send(part.input_top_logprobs[1], r)


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
    extend = [n for b in batches for n in b.extend_lens]
    return ForwardBatch(
        forward_mode=ForwardMode.of(extend),
        input_ids=cat([b.input_ids for b in batches]),
        positions=cat([b.positions for b in batches]),
        out_cache_loc=torch.empty(0, dtype=torch.int64),
        req_pool_indices=torch.empty(0, dtype=torch.int64),
        seq_lens=cat([b.seq_lens for b in batches]),
        seq_lens_cpu=[s for b in batches for s in b.seq_lens_cpu],
        prefix_lens=[p for b in batches for p in b.prefix_lens],
        extend_lens=extend,
        sample_indices=cat([b.sample_indices + off for b, off in zip(batches, offsets)]),
        logprob_indices=cat(lp_idx) if has_lp else None,
        logprob_target_ids=cat(lp_tgt) if has_lp else None,
        input_top_logprobs_num=max(b.input_top_logprobs_num for b in batches),
    )
