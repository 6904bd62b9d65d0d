"""Locating a checkpoint on local disk, its tokenizer, and its weights by Hugging Face name."""

from sglang.srt.configs.model_config import ModelLoadError
from sglang.srt.model_loader.default_model import default_model_path, load_tokenizer, resolve_model_path
from sglang.srt.model_loader.weights import iter_weights

__all__ = ["ModelLoadError", "default_model_path", "iter_weights", "load_tokenizer", "resolve_model_path"]
