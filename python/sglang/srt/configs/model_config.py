"""What the engine needs to know about a checkpoint, read once before anything is built.

A checkpoint is a local Hugging Face directory (config.json + *.safetensors) or a single
.gguf file. `ModelConfig.from_path` reads its transformers config, checks that we can serve
it (architecture, sliding window) and resolves the "auto" values (dtype, context length).
Models read the remaining details (rope parameters, norms, biases) from `hf_config` directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.configs.gguf_cache import load_from_gguf
from sglang.srt.utils import cpu_has_bf16_arithmetic

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# The model registry (sglang.srt.models) implements exactly these.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# transformers' GGUF config loader sets model_type but often leaves `architectures` empty.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# SGLang's --dtype choices.
DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_EXPLICIT_DTYPES = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}

# "owner/name" with no path prefix: what a Hugging Face Hub id looks like.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A checkpoint that is missing, unreadable or unsupported; the message says which and why."""


def check_local_model_path(model_path: str) -> str:
    """Returns the absolute path of a local model directory or .gguf file, else raises."""
    path = os.path.abspath(os.path.expanduser(model_path))
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(
                f"model path '{model_path}' is a file but not a .gguf file; "
                "give a Hugging Face model directory or a .gguf file"
            )
        return path
    if _HUB_ID_PATTERN.match(model_path):
        raise ModelLoadError(
            f"model path '{model_path}' is not a local directory or file; it looks like a Hugging Face "
            "Hub id, but only local paths are supported (this engine never downloads). Download it "
            f"first, e.g. `huggingface-cli download {model_path} --local-dir DIR`, and pass DIR"
        )
    raise ModelLoadError(f"model path '{model_path}' does not exist")


def cpu_supports_bf16() -> bool:
    """Whether bfloat16 models run well on this CPU: it has bf16 arithmetic (AVX512-BF16 or AMX),
    or sgl_kernel runs here on AVX2 or AVX-512, whose linear widens bf16 weights to float32 in
    registers (half the memory and bandwidth of float32 weights). torch alone does not: its bf16
    matmuls are oneDNN's emulation on plain AVX-512 and a plain loop on AVX2, 3-7x slower than
    its float32 ones."""
    if cpu_has_bf16_arithmetic():
        return True
    from sglang.srt.layers.cpu_kernels import cpu_kernels_isa

    return cpu_kernels_isa() in ("avx512", "avx2")


def resolve_dtype(dtype: str, checkpoint_dtype: Optional[torch.dtype], is_gguf: bool, device: str) -> torch.dtype:
    """The dtype to run in. "auto" keeps the checkpoint's dtype where the device runs it well:
    16-bit checkpoints run in bfloat16 on a CPU with bf16 support (float32 on one without),
    float32 stays float32, and dequantized GGUF runs in float32 on CPU and bfloat16 on CUDA."""
    if dtype != "auto":
        if dtype not in _EXPLICIT_DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; choices: {', '.join(DTYPE_CHOICES)}")
        return _EXPLICIT_DTYPES[dtype]
    on_cuda = device == "cuda" or device.startswith("cuda:")
    if not on_cuda and device != "cpu":
        raise ValueError(f"unknown device '{device}'; expected 'cpu' or 'cuda'")
    if is_gguf:
        return torch.bfloat16 if on_cuda else torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        if on_cuda:
            return checkpoint_dtype
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    # float32, or absent (transformers then defaults to float32 as well).
    return torch.float32


@dataclass
class ModelConfig:
    model_path: str  # absolute; the .gguf file itself for GGUF checkpoints
    hf_config: PretrainedConfig
    architecture: str
    dtype: torch.dtype
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context_len: int
    is_gguf: bool
    tie_word_embeddings: bool
    eos_token_ids: set[int]
    # The sampling parameters the model's authors recommend (generation_config.json's, or the
    # published ones of the embedded default model): what a request gets for those it omits.
    default_sampling_params: dict[str, float] = field(default_factory=dict)
    name: str = ""  # how the server reports the model; its path unless known better

    def __post_init__(self) -> None:
        assert self.architecture in SUPPORTED_ARCHITECTURES, self.architecture
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            self.num_attention_heads,
            self.num_key_value_heads,
        )
        assert self.context_len > 0, self.context_len

    @classmethod
    def from_path(
        cls, model_path: str, dtype: str = "auto", context_length: Optional[int] = None, device: str = "cpu"
    ) -> ModelConfig:
        path = check_local_model_path(model_path)
        is_gguf = path.endswith(".gguf")
        hf_config = _load_hf_config(path)
        architecture = _architecture(hf_config, path)
        context_len = _context_len(hf_config, context_length)
        _check_sliding_window(hf_config, architecture, context_len)
        num_heads = hf_config.num_attention_heads
        generation_config = _read_generation_config(path)
        return cls(
            model_path=path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=resolve_dtype(dtype, _checkpoint_dtype(hf_config), is_gguf, device),
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            context_len=context_len,
            is_gguf=is_gguf,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            eos_token_ids=_as_id_set(getattr(hf_config, "eos_token_id", None))
            | _as_id_set(generation_config.get("eos_token_id")),
            default_sampling_params=_sampling_defaults(generation_config),
            name=path,
        )


def _load_hf_config(path: str) -> PretrainedConfig:
    """transformers' config of a directory or GGUF file; for GGUF through the converted-artifacts
    cache, since transformers parses the whole header (vocabulary included) to build it."""
    from transformers import AutoConfig

    try:
        if path.endswith(".gguf"):
            return load_from_gguf(path, "config")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, struct errors...
        raise ModelLoadError(f"cannot read the model config of '{path}': {type(e).__name__}: {e}") from e


def _architecture(hf_config: PretrainedConfig, path: str) -> str:
    architectures = getattr(hf_config, "architectures", None)
    if architectures:
        architecture = architectures[0]
    else:
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in _ARCHITECTURE_BY_MODEL_TYPE:
            raise ModelLoadError(
                f"'{path}' names no architecture and its model_type '{model_type}' is "
                f"not one of {', '.join(_ARCHITECTURE_BY_MODEL_TYPE)}"
            )
        architecture = _ARCHITECTURE_BY_MODEL_TYPE[model_type]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture '{architecture}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def _context_len(hf_config: PretrainedConfig, context_length: Optional[int]) -> int:
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if context_length is None:
        if max_positions is None:
            raise ModelLoadError("the model config has no max_position_embeddings; pass a context length")
        return max_positions
    if context_length <= 0:
        raise ValueError(f"context length must be positive, got {context_length}")
    if max_positions is not None and context_length > max_positions:
        logger.warning(
            "context length %d exceeds the model's max_position_embeddings %d; outputs past %d tokens may be poor",
            context_length,
            max_positions,
            max_positions,
        )
    return context_length


def _check_sliding_window(hf_config: PretrainedConfig, architecture: str, context_len: int) -> None:
    """We have no sliding-window attention: refuse models that would need it at this length.
    Configs with `layer_types` (Qwen2/3) say per layer; Mistral applies any `sliding_window`."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = architecture == "MistralForCausalLM"
    if uses_window and window is not None and window < context_len:
        raise ModelLoadError(
            f"{architecture} uses sliding-window attention (window {window}), which this "
            f"engine does not implement; use a context length <= {window} "
            f"(now {context_len})"
        )


def _checkpoint_dtype(hf_config: PretrainedConfig) -> Optional[torch.dtype]:
    value = getattr(hf_config, "dtype", None)
    if not hasattr(hf_config, "dtype"):  # transformers < 4.56 (asking v5 for it logs a warning)
        value = getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _read_generation_config(path: str) -> dict[str, Any]:
    """A model directory's generation_config.json ({} when it has none); EOS ids there are often
    a longer list than config.json's, and its sampling fields are the authors' defaults."""
    generation_config = os.path.join(path, "generation_config.json")
    if not (os.path.isdir(path) and os.path.isfile(generation_config)):
        return {}
    try:
        with open(generation_config) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read '{generation_config}': {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"'{generation_config}' is not a JSON object")
    return data


# generation_config.json fields that are sampling defaults, under the engine's names; as in
# SGLang (`--sampling-defaults model`), only these, and only numbers.
_SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(generation_config: dict[str, Any]) -> dict[str, float]:
    return {
        key: generation_config[key]
        for key in _SAMPLING_DEFAULT_FIELDS
        if isinstance(generation_config.get(key), (int, float)) and not isinstance(generation_config[key], bool)
    }


def _as_id_set(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}  # type: ignore[union-attr]
