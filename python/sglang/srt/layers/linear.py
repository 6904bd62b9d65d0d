"""Linear layers whose weights are loaded, never initialized.

`MergedLinear` stacks several checkpoint matrices (q/k/v, or gate/up) into one weight so a
layer runs one matmul instead of several; `load_shard` places each checkpoint tensor at its
offset. Tensor parallelism replaces them with their sharded forms in one place
(`tensor_parallel.shard_model`), not in the models.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # torch.empty: the loader overwrites every element, so random init would be wasted time.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One weight holding several output blocks, named by shard id in `output_sizes` order."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_ids: Sequence[str], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shards = {sid: (off, size) for sid, off, size in zip(shard_ids, offsets, output_sizes)}
        self.output_sizes = list(output_sizes)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        offset, size = self.shards[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id}: expected {size} rows, checkpoint has {loaded.shape[0]}")
        param.data[offset : offset + size].copy_(loaded)
