"""Building a Scheduler for one rank: its model, KV memory and forward, per the server args."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.constrained.grammar_backend import GrammarBackend
from sglang.srt.distributed.cpu_binding import CpuBinding
from sglang.srt.distributed.parallel_state import ParallelState, init_distributed
from sglang.srt.distributed.tknp_comm import TknpComm
from sglang.srt.layers.tensor_parallel import TpGroup
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.tknp_runner import TknpModelRunner
from sglang.srt.model_loader import load_model_config_and_tokenizer
from sglang.srt.server_args import ServerArgs


def build_scheduler(
    args: ServerArgs,
    state: Optional[ParallelState] = None,
    host_available: Optional[int] = None,
    attention_threads: Optional[int] = None,
) -> tuple[Scheduler, ModelConfig, Any]:
    """The model, its KV memory and a scheduler over them, per the (resolved) server args;
    with `state`, one rank of a TKNP x TP layout (weights on the root's TP ranks only).
    `attention_threads`: a TKNP root that borrows its ranks' cores attends on that many."""
    model_config, tokenizer = load_model_config_and_tokenizer(
        args.model_path, args.tokenizer_path, args.dtype, args.context_length, args.device
    )
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
        forward = TknpModelRunner(
            runner,
            TknpComm.of(state, args.device),
            cuda_graph_max_bs=graph_max_bs,
            two_batch_overlap=args.enable_two_batch_overlap,
            attention_threads=attention_threads,
        )
    scheduler = Scheduler(
        runner,
        tokenizer,
        schedule_policy=args.schedule_policy,
        chunked_prefill_size=args.chunked_prefill_size,
        disable_radix_cache=args.disable_radix_cache,
        forward=forward,
        tknp_rank=tknp_rank,
        grammar_backend=_grammar_backend(args, tokenizer, model_config),
        wait_for_grammars=args.tp_size > 1,
    )
    return scheduler, model_config, tokenizer


def _grammar_backend(args: ServerArgs, tokenizer: Any, model_config: ModelConfig) -> Optional[GrammarBackend]:
    """Each rank compiles its own requests' grammars (under TKNP too: its sampler applies them)."""
    if args.grammar_backend == "none":
        return None
    return GrammarBackend.from_tokenizer(
        tokenizer,
        model_config.vocab_size,
        model_config.eos_token_ids,
        any_whitespace=not args.constrained_json_disable_any_whitespace,
    )


def _cuda_graph_max_bs(args: ServerArgs) -> Optional[int]:
    """The largest decode batch to capture graphs for; None runs every forward eagerly."""
    if args.disable_cuda_graph or args.device != "cuda":
        return None
    return args.cuda_graph_max_bs


def init_rank_distributed(
    args: ServerArgs, ipc: dict[str, str], global_rank: int, binding: CpuBinding = CpuBinding()
) -> ParallelState:
    """NCCL for the data (activations, q/k/v, logits) on GPUs, one GPU per rank; gloo on CPU and
    for the control plane everywhere."""
    layout = args.rank_layout()
    backend = "gloo"
    if args.device == "cuda":
        # every node numbers its GPUs from 0; check_rank_layout made sure there are enough
        torch.cuda.set_device(global_rank % args.ranks_per_node)
        backend = "nccl"
    # Ranks on this host exchange data through shared memory (TKNP's q/k/v, outputs, batches and
    # logits; TP's all-reduce and all-gather), waiting as their binding allows.
    shm_prefix = None if args.disable_shm_transport else ipc.get("shm_prefix")
    # Idle ranks wait inside a collective for as long as the server is idle.
    return init_distributed(
        layout,
        global_rank,
        ipc["dist_init"],
        backend,
        timeout=timedelta(days=365),
        shm_prefix=shm_prefix,
        local_ranks=args.node_ranks(),
        shm_spin=binding.transport_spin(),
    )
