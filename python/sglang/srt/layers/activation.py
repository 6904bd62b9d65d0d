"""Gated activations."""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up over the concatenated [gate | up] output of a merged projection."""

    def __init__(self):
        super().__init__()
        self._ops: Optional[Any] = None  # sgl_kernel's ops, once use_cpu_kernels switched them on

    def use_cpu_kernels(self, ops: Any) -> bool:
        self._ops = ops
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._ops is not None and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16):
            out = x.new_empty(x.shape[0], x.shape[1] // 2)
            self._ops.silu_and_mul(out, x if x.stride(-1) == 1 else x.contiguous())
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
