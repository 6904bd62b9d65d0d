"""Model classes by Hugging Face architecture name, imported on first use."""

import importlib

from torch import nn

_MODULES = {
    "LlamaForCausalLM": "sglang.srt.models.llama",
    "MistralForCausalLM": "sglang.srt.models.llama",
    "Qwen2ForCausalLM": "sglang.srt.models.qwen2",
    "Qwen3ForCausalLM": "sglang.srt.models.qwen3",
}


def supported_architectures() -> list[str]:
    return list(_MODULES)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODULES:
        raise ValueError(f"unsupported architecture '{architecture}'; supported: {', '.join(_MODULES)}")
    return getattr(importlib.import_module(_MODULES[architecture]), architecture)
