"""ServerArgs: every engine and server setting, with SGLang's flag names and defaults.

The command line is generated from the dataclass (flag `--foo-bar` for field `foo_bar`, help
from the field metadata), so defaults live in one place. `resolve()` turns "auto"/None values
into concrete ones and validates combinations once, before anything is built; errors are
ValueErrors whose message names the flag, for a one-line start-up error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from sglang.srt.distributed.cpu_binding import CpuBinding, lend_to_roots, numa_nodes, plan_bindings
from sglang.srt.distributed.parallel_state import RankLayout
from sglang.srt.layers.attention.registry import attention_backend_names

DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SCHEDULE_POLICIES = ("fcfs", "lpm")
SAMPLING_DEFAULTS = ("model", "openai")
GRAMMAR_BACKENDS = ("xgrammar", "none")
# the formats of srt/entrypoints/openai/tool_parsers.py (a test keeps the two lists equal)
TOOL_CALL_PARSERS = ("llama3", "qwen25", "mistral")
ATTENTION_BACKENDS = tuple(attention_backend_names())
DEVICES = ("auto", "cpu", "cuda")
LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "cache_aware")
# On CPU the pool's pages are committed lazily, so this share of RAM is an upper bound, not a cost.
_CPU_MEM_FRACTION = 0.5
_GPU_MEM_FRACTION = 0.85
_DEFAULT_CHUNKED_PREFILL = 8192
# SGLang's default on most GPUs: decode batches up to this size replay captured graphs.
_DEFAULT_CUDA_GRAPH_MAX_BS = 160
# Below Kubernetes' default 30 s between SIGTERM and SIGKILL, so requests still running at the
# deadline are aborted, and their clients answered, before the pod is killed.
_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT = 25.0
# Room for a batch of long token-id prompts (a 128k-token prompt is ~1 MB of JSON) while one
# request's parsed body stays a few hundred MB of Python objects at most.
_DEFAULT_MAX_REQUEST_BYTES = 16 << 20


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServerArgs:
    model_path: Optional[str] = _opt(
        None, "HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
    )
    tokenizer_path: Optional[str] = _opt(None, "tokenizer directory (default: the model's)")
    host: str = _opt("127.0.0.1", "address to bind")
    port: int = _opt(30000, "port to bind")
    dtype: str = _opt("auto", "weight and activation dtype", choices=DTYPES)
    context_length: Optional[int] = _opt(None, "maximum tokens per request (default: the model's)")
    device: str = _opt("auto", "device to run on", choices=DEVICES)
    tp_size: int = _opt(1, "tensor parallel size")
    tknp_size: int = _opt(
        1, "token parallel size: attention ranks, each owning the KV of its requests; weights on the first only"
    )
    load_balance_method: str = _opt(
        "cache_aware", "how the TKNP controller places requests on ranks", choices=LOAD_BALANCE_METHODS
    )
    cpu_omp_threads_bind: str = _opt(
        "auto",
        "CPU cores of each rank on this host: auto (each rank its own share, whole NUMA nodes where there are enough; "
        "shared when there are fewer cores than ranks; on a single NUMA node a TKNP root also runs its dense layers on "
        "its ranks' shares), all (no binding), or one CPU list per rank, 0-3|4-7 (lists may overlap: 0-1|1)",
    )
    disable_shm_transport: bool = _opt(
        False,
        "move the ranks' data on gloo even when they share a host (by default it goes through shared memory there)",
    )
    enable_two_batch_overlap: bool = _opt(
        False,
        "under --tknp-size > 1 on CPU, cut each decode step into two micro-batches so that the root runs the dense "
        "layers of one while the ranks attend the other",
    )
    dp_size: int = _opt(1, "data parallel size (only 1; use --tknp-size to scale KV capacity)")
    pp_size: int = _opt(1, "pipeline parallel size (only 1: pipeline parallelism is not supported)")
    nnodes: int = _opt(
        1, "hosts the ranks span; ranks are split evenly, node 0 holding the first ones and serving HTTP"
    )
    node_rank: int = _opt(0, "this host's index among --nnodes (0 serves HTTP; the others run their ranks only)")
    dist_init_addr: Optional[str] = _opt(
        None,
        "host:port of node 0 for --nnodes > 1: the ranks meet there, and the internal sockets use the ports after it",
    )
    mem_fraction_static: Optional[float] = _opt(None, "share of memory for weights and KV cache")
    max_total_tokens: Optional[int] = _opt(
        None, "KV cache capacity in tokens, rounded down to whole pages (overrides mem-fraction-static)"
    )
    page_size: int = _opt(
        1, "tokens per KV cache page; the pool and the prefix cache work in whole pages (FlashInfer's paged KV cache)"
    )
    max_running_requests: Optional[int] = _opt(None, "maximum requests decoding at once")
    max_queued_requests: Optional[int] = _opt(
        None,
        "most requests that may wait beyond --max-running-requests; more get HTTP 503 with Retry-After (default: no limit)",
    )
    chunked_prefill_size: Optional[int] = _opt(None, "prefill tokens per step; -1 disables chunking")
    schedule_policy: str = _opt("fcfs", "order in which waiting requests are admitted", choices=SCHEDULE_POLICIES)
    disable_radix_cache: bool = _opt(False, "disable prefix caching")
    grammar_backend: str = _opt(
        "xgrammar",
        "constrained decoding (sampling_params regex/json_schema/ebnf): xgrammar, or none to reject such requests",
        choices=GRAMMAR_BACKENDS,
    )
    constrained_json_disable_any_whitespace: bool = _opt(
        False,
        "json_schema output holds no whitespace but the spaces of ', ' and ': ' (a model may otherwise loop on it)",
    )
    attention_backend: Optional[str] = _opt(
        None,
        "attention kernels (default: flashinfer on CUDA when installed; on CPU, cpu (sgl_kernel's native kernels) when built, else torch_native, the plain-torch reference)",
        choices=ATTENTION_BACKENDS,
    )
    cuda_graph_max_bs: Optional[int] = _opt(
        None,
        f"largest decode batch replayed from a CUDA graph (default: {_DEFAULT_CUDA_GRAPH_MAX_BS}); larger batches run eagerly",
    )
    disable_cuda_graph: bool = _opt(False, "run every forward eagerly (CUDA graphs are never used on CPU)")
    random_seed: Optional[int] = _opt(None, "seed for requests that do not set sampling_seed")
    api_key: Optional[str] = _opt(None, "require 'Authorization: Bearer <key>' on every endpoint but /health")
    max_request_bytes: int = _opt(
        _DEFAULT_MAX_REQUEST_BYTES, "largest HTTP request body accepted, in bytes; a larger one gets HTTP 413"
    )
    served_model_name: Optional[str] = _opt(
        None, "model name reported by the API (default: the model path; SmolLM2-135M-Instruct for the embedded one)"
    )
    sampling_defaults: str = _opt(
        "model",
        "defaults for the sampling parameters a request omits: 'model' takes the model's recommended ones "
        "(generation_config.json), 'openai' the API's neutral ones (temperature 1, top_p 1)",
        choices=SAMPLING_DEFAULTS,
    )
    chat_template: Optional[str] = _opt(None, "chat template file (Jinja) overriding the tokenizer's")
    tool_call_parser: Optional[str] = _opt(
        None,
        "format in which chat completions find the model's tool calls (default: the one its chat template writes, if any)",
        choices=TOOL_CALL_PARSERS,
    )
    log_level: str = _opt("info", "logging level", choices=LOG_LEVELS)
    enable_metrics: bool = _opt(False, "serve Prometheus metrics at /metrics")
    watchdog_timeout: float = _opt(300.0, "seconds a forward may take before the server is declared stuck")
    graceful_shutdown_timeout: float = _opt(
        _DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
        "on SIGTERM/SIGINT, seconds in-flight requests may run on before they are aborted and the server exits",
    )

    def resolve(self) -> "ServerArgs":
        """Concrete values for every auto/None setting, after validation; returns self."""
        _check(self.port > 0 and self.port < 65536, "--port must be in 1..65535", self.port)
        self.rank_layout()  # rejects a --tp-size or --tknp-size below 1
        _check(
            self.load_balance_method in LOAD_BALANCE_METHODS,
            f"--load-balance-method must be one of {', '.join(LOAD_BALANCE_METHODS)}",
            self.load_balance_method,
        )
        if self.dp_size != 1:
            if self.tknp_size > 1:
                raise ValueError(
                    f"--tknp-size {self.tknp_size} and --dp-size {self.dp_size} are mutually exclusive; set one of them to 1"
                )
            raise ValueError(
                f"--dp-size must be 1 (data parallelism is not supported; use --tknp-size), got {self.dp_size}"
            )
        _check(self.pp_size == 1, "--pp-size must be 1 (pipeline parallelism is not supported)", self.pp_size)
        self._check_nodes()
        _check(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}", self.dtype)
        _check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}", self.device)
        _check(
            self.schedule_policy in SCHEDULE_POLICIES,
            f"--schedule-policy must be one of {', '.join(SCHEDULE_POLICIES)}",
            self.schedule_policy,
        )
        _check(
            self.grammar_backend in GRAMMAR_BACKENDS,
            f"--grammar-backend must be one of {', '.join(GRAMMAR_BACKENDS)}",
            self.grammar_backend,
        )
        _check(
            self.tool_call_parser is None or self.tool_call_parser in TOOL_CALL_PARSERS,
            f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}",
            self.tool_call_parser,
        )
        for name in ("context_length", "max_total_tokens", "max_running_requests"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1", value)
        _check(self.page_size >= 1, "--page-size must be >= 1", self.page_size)
        _check(self.max_request_bytes >= 1, "--max-request-bytes must be >= 1", self.max_request_bytes)
        if self.cuda_graph_max_bs is None:
            self.cuda_graph_max_bs = _DEFAULT_CUDA_GRAPH_MAX_BS
        _check(self.cuda_graph_max_bs >= 1, "--cuda-graph-max-bs must be >= 1", self.cuda_graph_max_bs)
        if self.max_total_tokens is not None:
            _check(
                self.max_total_tokens >= self.page_size,
                f"--max-total-tokens must hold at least one page of --page-size {self.page_size}",
                self.max_total_tokens,
            )
        _check(self.watchdog_timeout > 0, "--watchdog-timeout must be > 0", self.watchdog_timeout)
        _check(
            self.graceful_shutdown_timeout >= 0,
            "--graceful-shutdown-timeout must be >= 0",
            self.graceful_shutdown_timeout,
        )
        _check(
            self.max_queued_requests is None or self.max_queued_requests >= 0,
            "--max-queued-requests must be >= 0",
            self.max_queued_requests,
        )
        if self.mem_fraction_static is not None:
            _check(
                0 < self.mem_fraction_static < 1, "--mem-fraction-static must be in (0, 1)", self.mem_fraction_static
            )
        if self.model_path is not None and self.model_path.startswith("~"):
            self.model_path = os.path.expanduser(self.model_path)
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.attention_backend is None:
            self.attention_backend = _default_attention_backend(self.device, self.dtype)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.attention_backend == "flashinfer" and (reason := _flashinfer_unusable(self.device, self.dtype)):
            raise ValueError(
                f"--attention-backend flashinfer cannot run here: {reason}; use --attention-backend torch_native"
            )
        if self.enable_two_batch_overlap:
            _check(self.tknp_size > 1, "--enable-two-batch-overlap needs --tknp-size > 1", self.tknp_size)
            # NCCL's all_to_all joins every rank to every layer's exchange, in one order
            _check(
                self.device == "cpu",
                "--enable-two-batch-overlap runs on CPU ranks only (GPU ranks exchange q/k/v with NCCL all_to_all)",
                self.device,
            )
        if self.mem_fraction_static is None:
            self.mem_fraction_static = _GPU_MEM_FRACTION if self.device == "cuda" else _CPU_MEM_FRACTION
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = _DEFAULT_CHUNKED_PREFILL
        elif self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError(f"--chunked-prefill-size must be -1 (off) or >= 1, got {self.chunked_prefill_size}")
        if self.random_seed is None:
            self.random_seed = random.randrange(1 << 31)
        self.cpu_bindings()  # a CPU list that cannot be honoured is a start-up error
        return self

    def _check_nodes(self) -> None:
        _check(self.nnodes >= 1, "--nnodes must be >= 1", self.nnodes)
        _check(0 <= self.node_rank < self.nnodes, f"--node-rank must be in 0..{self.nnodes - 1}", self.node_rank)
        if self.nnodes == 1:
            return
        _check(
            self.world_size % self.nnodes == 0,
            f"--tknp-size x --tp-size ({self.world_size} ranks) must split evenly over --nnodes",
            self.nnodes,
        )
        if self.dist_init_addr is None:
            raise ValueError("--nnodes > 1 needs --dist-init-addr host:port (node 0's address, the same on every node)")
        self.dist_init_host_port()  # raises on a malformed address

    def dist_init_host_port(self) -> tuple[str, int]:
        """--dist-init-addr as (host, port); the internal sockets take the 2 + world_size ports
        after it."""
        host, _, port = (self.dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 - 3 - self.world_size:
            raise ValueError(
                f"--dist-init-addr must be host:port with a free port range after it, got {self.dist_init_addr!r}"
            )
        return host, int(port)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def cpu_bindings(self) -> list[CpuBinding]:
        """The cores of each rank this node runs (unbound on GPUs, and for a lone rank).

        `auto` lends TKNP ranks' cores to their root on a host with one NUMA node: the root runs
        every rank's dense layers, which want all the cores, while the others attend; measured
        in docs/benchmarks.md ("Core binding")."""
        spec = self.cpu_omp_threads_bind
        if self.device != "cpu" or (spec == "auto" and self.ranks_per_node == 1):
            return [CpuBinding()] * self.ranks_per_node
        bindings = plan_bindings(spec, self.ranks_per_node)
        if spec == "auto" and self.tknp_size > 1 and len(numa_nodes()) < 2:
            first = self.node_rank * self.ranks_per_node
            local = [[r - first for r in group] for group in self.rank_layout().tknp_group_ranks()]
            return lend_to_roots(bindings, [g for g in local if all(0 <= i < self.ranks_per_node for i in g)])
        return bindings

    def rank_layout(self) -> RankLayout:
        """Where each scheduler process sits: one per (TKNP rank, TP rank), TP fastest."""
        return RankLayout(tknp_size=self.tknp_size, tp_size=self.tp_size)

    @property
    def world_size(self) -> int:
        """Scheduler processes: one per (TKNP rank, TP rank)."""
        return self.rank_layout().world_size

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", help=help_text)
                continue
            parser.add_argument(
                flag, type=_arg_type(f), default=f.default, help=f"{help_text} (default: {f.default})", **meta
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        """For the offline Engine: an unknown keyword is a ValueError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["api_key"] = None if self.api_key is None else "***"
        return d


def _arg_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _default_attention_backend(device: str, dtype: str) -> str:
    if device == "cpu":
        return "cpu" if sgl_kernel_built() else "torch_native"
    return "torch_native" if _flashinfer_unusable(device, dtype) else "flashinfer"


def sgl_kernel_built() -> bool:
    """Whether the sgl_kernel package and its library are installed (without loading it)."""
    spec = importlib.util.find_spec("sgl_kernel")
    return (
        spec is not None
        and spec.origin is not None
        and os.path.exists(os.path.join(os.path.dirname(spec.origin), "libsgl_kernel_ops.so"))
    )


def _flashinfer_unusable(device: str, dtype: str) -> Optional[str]:
    """Why FlashInfer cannot serve this device and dtype, or None when it can."""
    if device != "cuda":
        return f"it needs CUDA (--device {device})"
    if importlib.util.find_spec("flashinfer") is None:
        return "the flashinfer package is not installed (pip install -e 'python[cuda]')"
    if dtype in ("float32", "float"):
        return f"it has no float32 kernels (--dtype {dtype})"
    return None


def check_rank_layout(args: ServerArgs, model_config: Any) -> None:
    """Rank-layout rules that need the model (head counts) and the devices; one-line ValueErrors."""
    num_devices = None
    if args.device == "cuda":
        import torch

        num_devices = torch.cuda.device_count() * args.nnodes  # each node has its own, alike
    args.rank_layout().validate(model_config.num_attention_heads, model_config.num_key_value_heads, num_devices)


def sampling_defaults(args: ServerArgs, model_config: Any) -> dict[str, float]:
    """What a request gets for the sampling parameters it omits, per --sampling-defaults."""
    return dict(model_config.default_sampling_params) if args.sampling_defaults == "model" else {}
