"""RMSNorm, computed in float32 as Hugging Face's Llama/Qwen implementations do."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalizes x; with `residual`, first adds it and also returns the sum (the new residual)."""
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
