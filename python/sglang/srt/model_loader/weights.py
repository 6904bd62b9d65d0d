"""Checkpoint tensors, named as in Hugging Face, for a model's load_weights.

A directory checkpoint is read from its *.safetensors files (never from .bin pickles, which
can run code on load); a GGUF checkpoint is dequantized by gguf_loader. Tensors come one at a
time so that at most one extra copy of a tensor is alive while the model copies it in.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

from sglang.srt.configs.model_config import ModelConfig, ModelLoadError

_INDEX_FILE = "model.safetensors.index.json"


def iter_weights(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the checkpoint, any float dtype; the model converts."""
    if model_config.is_gguf:
        from sglang.srt.model_loader.gguf_loader import iter_gguf_weights

        return iter_gguf_weights(model_config.model_path, model_config.hf_config)
    return iter_safetensors_weights(model_config.model_path)


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: those the index names if there is one (Mistral repos
    also ship a consolidated.safetensors in another naming), else every *.safetensors."""
    index_path = os.path.join(directory, _INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                file_names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read '{index_path}': {type(e).__name__}: {e}") from e
        files = [os.path.join(directory, name) for name in file_names]
        missing = [name for name, file in zip(file_names, files) if not os.path.isfile(file)]
        if missing:
            raise ModelLoadError(f"'{index_path}' lists files missing from {directory}: {', '.join(missing)}")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        has_bin = bool(glob.glob(os.path.join(directory, "*.bin")))
        hint = " (.bin checkpoints are not loaded: unpickling can run code; convert them to safetensors)"
        raise ModelLoadError(f"no *.safetensors files in {directory}{hint if has_bin else ''}")
    return files


def iter_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # SafetensorError for a bad header or a file shorter than it says
            raise ModelLoadError(f"cannot read safetensors file '{file}': {type(e).__name__}: {e}") from e
