"""RMSNorm, computed in float32 as Hugging Face's Llama/Qwen implementations do."""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self._ops: Optional[Any] = None  # sgl_kernel's ops, once use_cpu_kernels switched them on

    def use_cpu_kernels(self, ops: Any) -> bool:
        self._ops = ops
        return True

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalizes x; with `residual`, first adds it and also returns the sum (the new residual)."""
        if self._ops is not None and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16):
            return self._forward_kernel(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:
            # the same math in one fused op: fewer dispatches per layer on the decode path
            out = F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)
        else:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    def _forward_kernel(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        if x.stride(-1) != 1:
            x = x.contiguous()
        if residual is None:
            out = torch.empty_like(x)
            self._ops.rmsnorm(out, x, self.weight, self.variance_epsilon)
            return out
        # in place: x (a layer's fresh output) becomes the normalized sum, residual the sum
        self._ops.fused_add_rmsnorm(x, residual, self.weight, self.variance_epsilon)
        return x, residual
