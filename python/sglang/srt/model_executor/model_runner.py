"""ModelRunner: builds the model and the KV memory of one rank, and runs forwards on them.

KV capacity: `max_total_tokens` when given; otherwise what the memory budget leaves once the
weights are loaded: `available - total * (1 - mem_fraction_static)`, as SGLang sizes GPU pools;
either way rounded down to whole pages of `page_size` tokens.
Under TKNP on one CPU host the ranks split that budget (`memory_share`) and the root pays for
the weights out of its share. On CPU the buffers are allocated untouched (pages are committed as tokens are written), so a
large pool costs nothing until it is used.

dtype vs compute dtype: a CPU without bfloat16/float16 arithmetic runs a 16-bit model in float32
on weights rounded to the 16-bit dtype (so the values are the model's), with the KV cache kept in
the 16-bit dtype (so capacity is the model's). oneDNN's emulated 16-bit matmuls on such CPUs
measured 3-5x slower than float32.

CUDA graphs: with `cuda_graph_max_bs` set, on CUDA, with an attention backend that supports
them, decode batches of up to that many requests replay captured graphs (cuda_graph_runner.py);
everything else, and every forward on CPU, runs eagerly. `graphs` replaces CUDA's capture (CPU
tests); under TKNP the TKNP runner captures instead, since a step spans the group's ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.configs.model_config import ModelConfig, cpu_supports_bf16
from sglang.srt.layers.attention.base import AttentionShape
from sglang.srt.layers.attention.registry import create_attention_backend
from sglang.srt.layers.cpu_kernels import cpu_kernels_isa, sgl_kernel_ops, use_cpu_kernels
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.tensor_parallel import TpGroup, shard_model
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner, GraphCapturer, graph_max_bs
from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang.srt.model_loader import iter_weights
from sglang.srt.models.registry import get_model_class
from sglang.srt.utils import cpu_flags, cpu_has_bf16_arithmetic, device_memory, keep_freed_memory

logger = logging.getLogger(__name__)


@dataclass
class MemoryPlan:
    max_total_tokens: int
    max_running_requests: int
    weight_bytes: int


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        device: str,
        attention_backend: str,
        mem_fraction_static: float,
        max_total_tokens: int | None,
        max_running_requests: int | None,
        hold_weights: bool = True,
        memory_share: float = 1.0,
        available_memory: Optional[int] = None,
        tp: TpGroup = TpGroup(),
        page_size: int = 1,
        cuda_graph_max_bs: Optional[int] = None,
        graphs: Optional[GraphCapturer] = None,
    ):
        self.model_config = model_config
        self.device = device
        if device == "cpu" and keep_freed_memory():
            # measured: a prefill of 8 x 1024 tokens 4.9 -> 4.0 s (docs/benchmarks.md)
            logger.info("malloc keeps freed memory for reuse (no mmap, no trim)")
        # False on a non-root TKNP rank: the model stays on the meta device (shapes, layer
        # ids, no storage) and only its KV pool and attention run here.
        self.hold_weights = hold_weights
        self.tp = tp
        self.num_kv_heads = model_config.num_key_value_heads // tp.size  # the heads this rank keeps
        self.dtype = model_config.dtype
        self.compute_dtype = compute_dtype_for(self.dtype, device, kernels=attention_backend == "cpu")
        self.model = self._load_model()
        # in call order; on a rank without weights too (the model is on the meta device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, RadixAttention)]
        shape = AttentionShape.of(self.attention_layers, self.compute_dtype, self.dtype)
        attention_backend = _usable_backend(attention_backend, shape, device)
        if attention_backend == "cpu" and hold_weights:
            # the layers' native kernels come with the backend; the bf16 linear prepacks its
            # weights here, before the memory plan counts them
            num_layers = use_cpu_kernels(self.model)
            logger.info(
                "sgl_kernel: %s kernels on %d threads in attention and %d layers",
                cpu_kernels_isa(),
                sgl_kernel_ops().parallel_threads(),
                num_layers,
            )
        self.memory_share = memory_share
        self.available_memory = available_memory
        self.page_size = page_size
        self.plan = self._plan_memory(mem_fraction_static, max_total_tokens, max_running_requests)
        self.req_to_token_pool = ReqToTokenPool(
            self.plan.max_running_requests, model_config.context_len + 1, device=device
        )
        self.allocator = TokenToKVPoolAllocator(self.plan.max_total_tokens, page_size)
        self.kv_pool = MHATokenToKVPool(
            self.plan.max_total_tokens,
            self.dtype,
            self.num_kv_heads,
            model_config.head_dim,
            model_config.num_hidden_layers,
            device=device,
            page_size=page_size,
        )
        self.attn_backend = create_attention_backend(attention_backend, shape, device)
        self.cuda_graph_runner = self._init_cuda_graphs(cuda_graph_max_bs, graphs)

    def _load_model(self) -> torch.nn.Module:
        cfg = self.model_config
        start = time.perf_counter()
        model_cls = get_model_class(cfg.architecture)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.compute_dtype)
        try:
            # Shapes first, storage after: a TP rank allocates only its shard.
            with torch.device("meta"):
                model = model_cls(cfg.hf_config, max_position=cfg.context_len + 1)
                if self.tp.size > 1:
                    shard_model(model, self.tp)
            if self.hold_weights:
                model.to_empty(device=self.device)  # every parameter is overwritten by the loader
        finally:
            torch.set_default_dtype(previous)
        if not self.hold_weights:
            logger.info("built %s without weights (a TKNP attention rank)", cfg.architecture)
            return model.eval()
        weights = iter_weights(cfg)
        if self.compute_dtype != self.dtype:
            weights = ((name, t.to(self.dtype).to(self.compute_dtype)) for name, t in weights)
        model.load_weights(weights)
        model.eval()
        logger.info(
            "loaded %s (%s%s, %s) in %.1f s",
            cfg.architecture,
            _name(self.dtype),
            f", computed in {_name(self.compute_dtype)}" if self.compute_dtype != self.dtype else "",
            self.device,
            time.perf_counter() - start,
        )
        return model

    def _plan_memory(self, mem_fraction: float, max_total_tokens: int | None, max_running: int | None) -> MemoryPlan:
        cfg = self.model_config
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)
        per_token = MHATokenToKVPool.bytes_per_token(self.dtype, self.num_kv_heads, cfg.head_dim, cfg.num_hidden_layers)
        if max_total_tokens is None:
            available, total = device_memory(self.device)
            budget = available - total * (1 - mem_fraction)
            if self.memory_share < 1:
                # TKNP ranks sharing one host's memory split the budget measured once, before any
                # rank loaded weights; each pays for its own weights out of its share, so the root
                # (the only rank with weights) gets the smallest KV pool.
                before_weights = (
                    self.available_memory if self.available_memory is not None else available + weight_bytes
                )
                budget = (before_weights - total * (1 - mem_fraction)) * self.memory_share - weight_bytes
            if budget < per_token * max(16, self.page_size):
                raise ValueError(
                    f"not enough memory for the KV cache: {available / 2**30:.1f} GiB available, "
                    f"mem_fraction_static={mem_fraction} leaves {max(budget, 0) / 2**30:.2f} GiB; "
                    "raise --mem-fraction-static or set --max-total-tokens"
                )
            max_total_tokens = int(budget // per_token)
        max_total_tokens -= max_total_tokens % self.page_size
        assert max_total_tokens > 0, f"the KV cache holds less than one page of {self.page_size} tokens"
        # a running request holds at least one page
        max_running = max_running or min(2048, max_total_tokens // self.page_size)
        if self.tp.size > 1:
            # TP ranks schedule in lockstep, so they must agree on their pool: the smallest wins
            agreed = self.tp.all_reduce_min(torch.tensor([max_total_tokens, max_running]))
            max_total_tokens, max_running = (int(x) for x in agreed)
        return MemoryPlan(max_total_tokens, max_running, weight_bytes)

    def _init_cuda_graphs(self, max_bs: Optional[int], graphs: Optional[GraphCapturer]) -> Optional[CudaGraphRunner]:
        """Graphs when asked for (`max_bs` set) and this rank can run them; else None (eager)."""
        if not self.hold_weights or (graphs is None and torch.device(self.device).type != "cuda"):
            return None  # no model forward to capture here, or nothing to capture it with
        max_bs = graph_max_bs(max_bs, self.attn_backend, self.plan.max_running_requests)
        if max_bs is None:
            return None
        body = lambda batch: self.model(batch.input_ids, batch.positions, batch)  # noqa: E731
        return CudaGraphRunner(body, self.attn_backend, self.req_to_token_pool, self.kv_pool, max_bs, graphs)

    def attach(self, batch: ForwardBatch) -> ForwardBatch:
        """Points a batch at this rank's pools and backend, its tensors on this rank's device."""
        batch.req_to_token_pool = self.req_to_token_pool
        batch.token_to_kv_pool = self.kv_pool
        batch.attn_backend = self.attn_backend
        return batch.to(self.device)

    def _graph_bucket(self, batch: ForwardBatch) -> Optional[int]:
        """The graph a batch replays: decode steps that need the sampled rows' logits only."""
        if self.cuda_graph_runner is None or batch.forward_mode != ForwardMode.DECODE:
            return None
        if batch.logprob_indices is not None or batch.return_all_logits:
            return None
        return self.cuda_graph_runner.bucket(batch.batch_size)

    # A runner is its scheduler's Forward: one rank, nothing moves between ranks.
    comm_seconds = wait_seconds = 0.0
    overlapped_steps = 0

    def __call__(self, batch: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        return self.forward(batch)

    def forward(self, batch: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        if batch is None:
            return None
        self.attach(batch)
        size = self._graph_bucket(batch)
        if size is not None:
            out = self.cuda_graph_runner.replay(batch, size)
            # indexing copies, so the next replay cannot overwrite what the caller holds
            return LogitsProcessorOutput(next_token_logits=out.next_token_logits[batch.sample_indices])
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch.input_ids, batch.positions, batch)


def _usable_backend(name: str, shape: AttentionShape, device: str) -> str:
    """`name`, or torch_native (with one log line) where the cpu backend cannot run the model."""
    if name == "cpu":
        from sglang.srt.layers.attention.cpu_backend import cpu_backend_unsupported

        reason = cpu_backend_unsupported(shape, device)
        if reason is not None:
            logger.warning("attention backend cpu cannot run this model (%s): using torch_native", reason)
            return "torch_native"
    return name


def compute_dtype_for(dtype: torch.dtype, device: str, kernels: bool) -> torch.dtype:
    """The dtype matmuls run in: float32 for 16-bit models on a CPU that runs them badly. A bf16
    model keeps bf16 where the CPU has bf16 arithmetic, or where `kernels` (the cpu attention
    backend, which brings sgl_kernel's linears) run bf16 well (cpu_supports_bf16)."""
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
        if dtype == torch.bfloat16:
            native = cpu_supports_bf16() if kernels else cpu_has_bf16_arithmetic()
        else:
            native = bool(cpu_flags() & {"avx512_fp16", "amx_fp16"})
        if not native:
            return torch.float32
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
