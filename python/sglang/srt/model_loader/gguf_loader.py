"""Reading a GGUF checkpoint as Hugging Face named float32 tensors.

gguf_file reads the header and memory-maps the file. Each tensor is dequantized to a float32
array (Q4_0, Q4_1 and Q8_0 by the numpy code below, other formats by the `gguf` package),
renamed from llama.cpp's naming (blk.N.attn_q.weight) to Hugging Face's
(model.layers.N.self_attn.q_proj.weight), and, for Llama-family files, has the q/k row order
that llama.cpp's converter changed put back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from sglang.srt.configs.model_config import ModelLoadError
from sglang.srt.model_loader.gguf_file import read_gguf

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


def _scales(blocks: np.ndarray, start: int) -> np.ndarray:
    """float32 [N, 1]: the f16 stored at bytes [start, start + 2) of each block."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _dequantize_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # blocks: uint8 [N, 34] = f16 scale, 32 x int8; out: float32 [N, 32]
    out[:] = blocks[:, 2:].view(np.int8)
    out *= _scales(blocks, 0)


def _dequantize_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # blocks: uint8 [N, 18] = f16 scale, 16 bytes: value i (+ 8) in byte i's low nibble, value
    # 16 + i (+ 8) in its high nibble; out: float32 [N, 32]
    packed = blocks[:, 2:]
    out[:, :16] = (packed & 0x0F).view(np.int8) - np.int8(8)
    out[:, 16:] = (packed >> 4).view(np.int8) - np.int8(8)
    out *= _scales(blocks, 0)


def _dequantize_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # blocks: uint8 [N, 20] = f16 scale, f16 minimum, 16 bytes of nibbles as in Q4_0 (no offset)
    packed = blocks[:, 4:]
    out[:, :16] = packed & 0x0F
    out[:, 16:] = packed >> 4
    out *= _scales(blocks, 0)
    out += _scales(blocks, 2)


# The commonest llama.cpp block formats, written into one preallocated array a chunk of blocks
# at a time: the same float32 operations in the same order as gguf.quants (so equal bit for
# bit, which a test checks) but 3-5x faster than its per-16-rows Python loop and concatenation.
# numpy rather than torch: torch's threaded kernels slow down tenfold on a busy 2-core machine.
# Other types go through gguf.quants.
_FAST_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
}
_CHUNK_BLOCKS = 1 << 12  # keeps a chunk (512 KiB of output) in cache between the passes


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 `shape` from a tensor's stored bytes (uint8 [rows, bytes per row]); unquantized
    tensors may come back as views of `raw`."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in _FAST_DEQUANTIZERS:
        return gguf.quants.dequantize(raw, qtype).reshape(shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        _FAST_DEQUANTIZERS[qtype](blocks[start : start + _CHUNK_BLOCKS], out[start : start + _CHUNK_BLOCKS])
    return out.reshape(shape)


def iter_gguf_weights(path: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every parameter tensor in the GGUF file. The
    header is read (and every tensor's byte range checked) before the first tensor comes."""
    gguf_file = read_gguf(path)
    permute_heads = {}
    if getattr(hf_config, "model_type", None) in _PERMUTED_MODEL_TYPES:
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        permute_heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    for tensor in gguf_file.tensors:
        try:
            name = hf_name(tensor.name)
        except KeyError:
            raise ModelLoadError(
                f"GGUF file '{path}' has tensor '{tensor.name}', which we cannot map to a Hugging Face parameter"
            ) from None
        if name is None:
            continue
        raw = gguf_file.raw_bytes(tensor)
        try:
            array = dequantize(raw, tensor.ggml_type, tensor.shape)
        except Exception as e:
            type_name = GGMLQuantizationType(tensor.ggml_type).name
            raise ModelLoadError(
                f"cannot dequantize tensor '{tensor.name}' ({type_name}) of GGUF file '{path}': {type(e).__name__}: {e}"
            ) from e
        piece = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if piece in permute_heads:
            array = unpermute_rotary_rows(array, permute_heads[piece])
        if np.may_share_memory(array, raw):
            array = array.copy()  # unquantized tensors come back as views of the memory map
        yield name, torch.from_numpy(array.astype(np.float32, copy=False))
