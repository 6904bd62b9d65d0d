"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padding.

A decode step of a small batch is hundreds of short kernels whose launch cost exceeds their
work; a CUDA graph launches them all at once. A graph fixes its tensors' shapes and addresses, so:

- a batch is padded up to the next captured size (a bucket: 1, 2, 4, 8, then every 8 up to 256,
  then every 16, up to `--cuda-graph-max-bs`) by `pad_decode_batch`. A padding request is one
  token (id 0, position 0, seq_len 1) whose req_to_token row is the pool's padding row (every
  entry slot 0), so it writes and reads only the padding slot; real rows' outputs do not change,
  and the padding rows' logits are dropped;
- replay copies the padded inputs into the static buffers the graph was captured on, lets the
  attention backend re-plan its kernels for the real sequence lengths (into fixed buffers the
  graph reads), and replays; the caller reads the graph's static outputs.

`CudaGraphRunner` captures whatever a rank runs for its decode batch, given as a `body`: the
model forward on one rank (model_runner.py); under TKNP the root's forward of the global batch,
with the scatter/gather inside, and a non-root rank's attention loop (tknp_runner.py). Every rank
captures the same buckets in the same order, so collectives inside the graphs pair up.

Capture itself goes through a `GraphCapturer`: `CudaGraphs` on CUDA. CPU tests pass one that
re-runs the captured function on replay, which exercises everything here (static buffers,
padding, re-planning, fixed splits) but the CUDA capture.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import torch

from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base import AttentionBackend
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

logger = logging.getLogger(__name__)

_WARMUP_RUNS = 2  # eager runs before each capture (CudaGraphs)
_FINE_STEP_LIMIT = 256  # buckets every 8 up to here, every 16 above, as SGLang spaces them


def capture_batch_sizes(max_bs: int) -> list[int]:
    """The batch sizes graphs are captured for, ascending; the last is `max_bs`."""
    assert max_bs >= 1, max_bs
    sizes = [1, 2, 4, 8] + list(range(16, _FINE_STEP_LIMIT + 1, 8))
    sizes += list(range(_FINE_STEP_LIMIT + 16, max_bs + 1, 16))
    sizes = [s for s in sizes if s < max_bs]
    return sizes + [max_bs]


def bucket_for(batch_size: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket of `buckets` (ascending) that holds `batch_size` requests; None when
    the batch is larger than every bucket."""
    i = bisect.bisect_left(buckets, batch_size)
    return buckets[i] if i < len(buckets) else None


def pad_decode_batch(batch: ForwardBatch, size: int, padding_row: int) -> ForwardBatch:
    """A copy of the decode `batch` with padding requests appended up to `size` requests.

    Each padding request is one token (id 0, position 0) written to slot 0, with seq_len 1 and
    req_to_token row `padding_row` (all slot 0): it touches only the padding slot. sample_indices
    keep naming the real rows, so an eager forward computes no logits for padding rows."""
    assert batch.forward_mode == ForwardMode.DECODE, batch.forward_mode
    num_pad = size - batch.batch_size
    assert num_pad >= 0, f"a batch of {batch.batch_size} does not fit in {size}"
    if num_pad == 0:
        return batch

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((num_pad,), value)])

    return dataclasses.replace(
        batch,
        input_ids=pad(batch.input_ids, 0),
        positions=pad(batch.positions, 0),
        out_cache_loc=pad(batch.out_cache_loc, 0),
        req_pool_indices=pad(batch.req_pool_indices, padding_row),
        seq_lens=pad(batch.seq_lens, 1),
        seq_lens_cpu=batch.seq_lens_cpu + [1] * num_pad,
        kv_lens=batch.kv_lens + [0] * num_pad,
        extend_lens=batch.extend_lens + [1] * num_pad,
        attn_metadata=None,
    )


class GraphCapturer(Protocol):
    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Captures `fn`; returns a replay function and fn's output, which every replay
        overwrites in place."""


class CudaGraphs:
    """CUDA graphs sharing one memory pool (they replay one at a time). Each capture first runs
    `fn` eagerly: lazily built state (JIT-built and autotuned kernels, communicators, caches)
    settles there, so the capture records only the step's own kernels."""

    def __init__(self) -> None:
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream()

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(_WARMUP_RUNS):
                fn()
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out = fn()
        return graph.replay, out


class CudaGraphRunner:
    """`body(batch)` captured per bucket over static decode batches of this rank, and replayed."""

    def __init__(
        self,
        body: Callable[[ForwardBatch], Any],
        attn_backend: "AttentionBackend",
        req_to_token_pool: "ReqToTokenPool",
        kv_pool: "MHATokenToKVPool",
        max_bs: int,
        graphs: Optional[GraphCapturer] = None,
    ):
        self.attn_backend = attn_backend
        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = kv_pool
        self.buckets = capture_batch_sizes(max_bs)
        self.max_bs = max_bs
        self.num_replays = 0
        device = req_to_token_pool.req_to_token.device
        # Static inputs: the graph of bucket bs reads their first bs rows. Their resting values
        # are a padding request's, so warmup and capture touch only the padding slot.
        zeros = lambda n: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
        self._input_ids, self._positions, self._out_cache_loc = zeros(max_bs), zeros(max_bs), zeros(max_bs)
        self._req_pool_indices = torch.full((max_bs,), req_to_token_pool.padding_row, dtype=torch.int64, device=device)
        self._seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self._sample_indices = torch.arange(max_bs, device=device)  # every row: callers pick the real ones
        # what an empty partition (TKNP) pads from
        self._empty = ForwardBatch(
            ForwardMode.DECODE,
            zeros(0),
            zeros(0),
            zeros(0),
            zeros(0),
            zeros(0),
            [],
            [],
            [],
            zeros(0),
            req_to_token_pool=req_to_token_pool,
            token_to_kv_pool=kv_pool,
            attn_backend=attn_backend,
        )
        self._batches: dict[int, ForwardBatch] = {}
        self._replays: dict[int, Callable[[], None]] = {}
        self._outputs: dict[int, Any] = {}
        attn_backend.init_cuda_graph_state(max_bs, req_to_token_pool.max_context_len, kv_pool)
        self._capture_all(body, graphs if graphs is not None else CudaGraphs())

    def bucket(self, batch_size: int) -> Optional[int]:
        """The captured size a decode batch of `batch_size` requests replays at; None if none."""
        return bucket_for(batch_size, self.buckets)

    def replay(self, batch: Optional[ForwardBatch], size: int) -> Any:
        """The body's output for the decode `batch` (None: an empty one) padded to `size`. The
        output is the graph's own: the next replay overwrites it."""
        padded = pad_decode_batch(batch if batch is not None else self._empty, size, self.req_to_token_pool.padding_row)
        static = self._batches[size]
        for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens"):
            getattr(static, name).copy_(getattr(padded, name), non_blocking=True)
        # planned on the padded batch: its tensors now hold what the static buffers hold
        self.attn_backend.init_forward_metadata_replay(padded)
        self._replays[size]()
        self.num_replays += 1
        return self._outputs[size]

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=self._input_ids[:size],
            positions=self._positions[:size],
            out_cache_loc=self._out_cache_loc[:size],
            req_pool_indices=self._req_pool_indices[:size],
            seq_lens=self._seq_lens[:size],
            seq_lens_cpu=[1] * size,
            kv_lens=[0] * size,
            extend_lens=[1] * size,
            sample_indices=self._sample_indices[:size],
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )

    def _capture_all(self, body: Callable[[ForwardBatch], Any], graphs: GraphCapturer) -> None:
        start = time.perf_counter()
        # Largest first: the smaller graphs then reuse the shared pool's memory.
        for size in reversed(self.buckets):
            batch = self._static_batch(size)
            self.attn_backend.init_forward_metadata_capture(batch)
            self._replays[size], self._outputs[size] = graphs.capture(lambda batch=batch: body(batch))
            self._batches[size] = batch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        logger.info(
            "captured graphs for decode batch sizes %s in %.1f s",
            ", ".join(map(str, self.buckets)),
            time.perf_counter() - start,
        )


def graph_max_bs(max_bs: Optional[int], attn_backend: "AttentionBackend", max_running_requests: int) -> Optional[int]:
    """The largest decode batch to capture for (`max_bs` asked for, None when not), or None
    (with a log line saying why) when this rank runs every forward eagerly."""
    if max_bs is None:
        return None
    if not attn_backend.supports_cuda_graph:
        logger.info("CUDA graphs off: the %s attention backend does not support them", type(attn_backend).__name__)
        return None
    # a bucket beyond the most requests that can run at once would never replay
    return min(max_bs, max_running_requests)
