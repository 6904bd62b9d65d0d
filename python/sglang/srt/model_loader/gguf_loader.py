"""Reading a GGUF checkpoint as Hugging Face named float32 tensors.

GGUFReader (from the `gguf` package) memory-maps the file; each tensor is dequantized to a
float32 array, renamed from llama.cpp's naming (blk.N.attn_q.weight) to Hugging Face's
(model.layers.N.self_attn.q_proj.weight), and, for Llama-family files, has the q/k row order
that llama.cpp's converter changed put back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from sglang.srt.configs.model_config import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_PIECES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",  # Qwen3
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tensors llama.cpp stores that are no Hugging Face parameter: transformers derives them from
# the config (e.g. Llama 3's rope scaling factors).
_SKIPPED_NAMES = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

# llama.cpp's converter reorders q/k rows for these model types only (not for Qwen).
_PERMUTED_MODEL_TYPES = {"llama", "mistral"}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_LEVEL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor; None for tensors to skip."""
    if gguf_name in _SKIPPED_NAMES:
        return None
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in _LAYER_PIECES:
        layer, piece, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_PIECES[piece]}.{kind}"
    match = _TOP_LEVEL_NAME.match(gguf_name)
    if match and match.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[match.group(1)]}.{match.group(2)}"
    raise KeyError(gguf_name)


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order. Per head, Hugging Face keeps the rotary pairs' first
    halves in rows [0, D/2) and second halves in [D/2, D) (rotate_half); llama.cpp interleaves
    them (rows 2i, 2i+1 form pair i). Works for weights [H*D, hidden] and biases [H*D]."""
    rows = w.shape[0]
    assert rows % num_heads == 0 and (rows // num_heads) % 2 == 0, (w.shape, num_heads)
    head_dim = rows // num_heads
    # [H, D/2, 2, ...] (llama.cpp) -> [H, 2, D/2, ...] (Hugging Face)
    split = w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(w.shape)


def iter_gguf_weights(path: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every parameter tensor in the GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:  # ValueError, KeyError, struct/numpy errors on a truncated file...
        raise ModelLoadError(f"cannot read GGUF file '{path}' (truncated or not GGUF?): "
                             f"{type(e).__name__}: {e}") from e
    permute_heads = {}
    if getattr(hf_config, "model_type", None) in _PERMUTED_MODEL_TYPES:
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        permute_heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    for tensor in reader.tensors:
        try:
            name = hf_name(tensor.name)
        except KeyError:
            raise ModelLoadError(f"GGUF file '{path}' has tensor '{tensor.name}', which we cannot map "
                                 "to a Hugging Face parameter") from None
        if name is None:
            continue
        # GGUF lists dims fastest-varying first; torch wants them the other way round.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            # A plain ndarray view: slicing a np.memmap costs ~10x more per slice.
            array = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize tensor '{tensor.name}' ({tensor.tensor_type.name}) "
                                 f"of GGUF file '{path}': {type(e).__name__}: {e}") from e
        piece = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if piece in permute_heads:
            array = unpermute_rotary_rows(array, permute_heads[piece])
        if np.may_share_memory(array, tensor.data):
            array = array.copy()  # unquantized tensors come back as views of the memory map
        yield name, torch.from_numpy(array.astype(np.float32, copy=False))
