"""Rotary position embeddings (neox layout: the rotated halves are the first and second half).

Supported `rope_type`s: default, linear, llama3. cos/sin are precomputed once for every
position up to the context length and looked up by position, so a step costs one gather.
"""

import math
import threading
from typing import Any, Optional

import torch
from torch import nn


def rope_parameters(hf_config: Any) -> dict:
    """The rope settings of a config, whichever transformers version wrote it.

    transformers >= 5 keeps them in `rope_parameters`; older configs use `rope_theta` and an
    optional `rope_scaling` dict.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1 keeps high frequencies, divides low ones by `factor`, and blends in between.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type '{rope_type}'; supported: default, linear, llama3")
        self.head_dim = head_dim
        base = float(params["rope_theta"])
        # Computed on the CPU even when the model is built on the meta device (weights come
        # later; these are not weights), and moved to the device of the first forward.
        cpu = torch.device("cpu")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=cpu).float() / head_dim))
        positions = torch.arange(max_position, dtype=torch.float32, device=cpu)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        elif rope_type == "linear":
            positions = positions / float(params["factor"])
        freqs = torch.outer(positions, inv_freq)
        # [max_position, head_dim]: cos and sin of the rotation, halves repeated (neox layout).
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache, self.sin_cache = emb.cos(), emb.sin()
        # One instance serves every layer of a model: the model looks cos/sin up once per
        # forward (`prepare`), and every layer's rotation reuses them. Once per forward, never
        # cached across forwards: a CUDA graph replays its positions buffer with new contents.
        # Per thread: under two-batch overlap two forwards take turns, one in each thread.
        self._forward = threading.local()
        # sgl_kernel's ops, once use_cpu_kernels switched them on: the kernel rotates q and k in
        # place, reading cos/sin ([max_position, head_dim / 2], float32) by position itself.
        self._ops: Optional[Any] = None
        self._cos_sin_half: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_cpu_kernels(self, ops: Any) -> bool:
        if self.head_dim % 2:
            return False
        half = self.head_dim // 2
        self._ops = ops
        self._cos_sin_half = (self.cos_cache[:, :half].contiguous(), self.sin_cache[:, :half].contiguous())
        return True

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """Looks up cos/sin for this forward's positions, in the dtype q and k will have."""
        forward = self._forward
        forward.positions = positions
        if self._use_kernel(positions, dtype):
            forward.cos_sin = None
            return
        if self.cos_cache.device != positions.device:
            self.cos_cache, self.sin_cache = self.cos_cache.to(positions.device), self.sin_cache.to(positions.device)
        forward.cos_sin = (
            self.cos_cache[positions].unsqueeze(1).to(dtype),
            self.sin_cache[positions].unsqueeze(1).to(dtype),
        )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim]
        forward = self._forward
        assert positions is getattr(forward, "positions", None), "prepare(positions) comes first in every forward"
        if forward.cos_sin is None:  # prepare chose the kernel
            self._ops.rotary_embedding(positions, q, k, *self._cos_sin_half)
            return q, k
        cos, sin = forward.cos_sin
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _use_kernel(self, positions: torch.Tensor, dtype: torch.dtype) -> bool:
        return self._ops is not None and positions.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def get_rope(head_dim: int, max_position: int, hf_config: Any) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, rope_parameters(hf_config))
