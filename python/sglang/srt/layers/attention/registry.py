"""Attention backends by name, imported lazily so CPU runs never import CUDA libraries.

This module imports nothing heavy: ServerArgs reads the names from it for --help.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sglang.srt.layers.attention.base import AttentionBackend, AttentionShape

_BACKENDS = {
    "cpu": "sglang.srt.layers.attention.cpu_backend:CpuAttnBackend",  # sgl_kernel's native CPU kernels
    "torch_native": "sglang.srt.layers.attention.torch_native:TorchNativeAttnBackend",
    "flashinfer": "sglang.srt.layers.attention.flashinfer_backend:FlashInferAttnBackend",  # CUDA only
}


def attention_backend_names() -> list[str]:
    return list(_BACKENDS)


def create_attention_backend(name: str, shape: "AttentionShape", device: "torch.device | str") -> "AttentionBackend":
    """Backend `name` for a model's attention `shape`, its buffers on `device`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choices: {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(shape, device)
