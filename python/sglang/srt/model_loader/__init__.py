"""Locating a checkpoint on local disk, its tokenizer, and its weights by Hugging Face name."""

import dataclasses
from typing import Any, Optional

from sglang.srt.configs.model_config import ModelConfig, ModelLoadError
from sglang.srt.model_loader.default_model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_SAMPLING,
    default_model_path,
    load_tokenizer,
    resolve_model_path,
)
from sglang.srt.model_loader.weights import iter_weights

__all__ = [
    "ModelLoadError",
    "default_model_path",
    "iter_weights",
    "load_model_config_and_tokenizer",
    "load_tokenizer",
    "resolve_model_path",
]


def load_model_config_and_tokenizer(
    model_path: Optional[str],
    tokenizer_path: Optional[str] = None,
    dtype: str = "auto",
    context_length: Optional[int] = None,
    device: str = "cpu",
) -> tuple[ModelConfig, Any]:
    """A model's config and tokenizer (None: the default model's); reads no weights."""
    model_config = ModelConfig.from_path(resolve_model_path(model_path), dtype, context_length, device)
    if model_path is None:
        model_config = dataclasses.replace(
            model_config, name=DEFAULT_MODEL_NAME, default_sampling_params=dict(DEFAULT_MODEL_SAMPLING)
        )
    return model_config, load_tokenizer(model_config.model_path, tokenizer_path)
