"""Attention backends by name, imported lazily so CPU runs never import CUDA libraries."""

import importlib

from sglang.srt.layers.attention.base import AttentionBackend

_BACKENDS = {
    "torch_native": "sglang.srt.layers.attention.torch_native:TorchNativeAttnBackend",
}


def attention_backend_names() -> list[str]:
    return list(_BACKENDS)


def create_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choices: {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()
