"""Linear layers whose weights are loaded, never initialized.

`MergedLinear` stacks several checkpoint matrices (q/k/v, or gate/up) into one weight so a
layer runs one matmul instead of several; `load_shard` places each checkpoint tensor at its
offset. Tensor parallelism replaces them with their sharded forms in one place
(`tensor_parallel.shard_model`), not in the models.
"""

import sys
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.utils import cpu_has_bf16_arithmetic


class Linear(nn.Module):
    # False where the bias is added after a reduction over ranks (row-parallel TP), not per rank
    bias_in_matmul = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # torch.empty: the loader overwrites every element, so random init would be wasted time.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._kernel: Optional[BF16LinearKernel] = None

    def use_cpu_kernels(self, ops: Any) -> bool:
        """bf16 weights on the CPU: prepack them for sgl_kernel.linear."""
        if self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu":
            return False
        self._kernel = BF16LinearKernel(ops, self.weight, self.bias if self.bias_in_matmul else None)
        # a buffer, so the memory plan counts it (module.buffers()) beside the weights
        self.register_buffer("packed_weight", self._kernel.packed, persistent=False)
        if linear_kernel_max_rows() == sys.maxsize:
            # the kernel takes every bf16 input (activations are in the weights' dtype), so the
            # unpacked weight would never be read again: its memory goes to the KV cache
            self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T, plus the bias where `bias_in_matmul`."""
        if self._kernel is not None and x.dtype == torch.bfloat16 and x.shape[0] <= linear_kernel_max_rows():
            return self._kernel(x)
        return F.linear(x, self.weight, self.bias if self.bias_in_matmul else None)


# Rows up to which sgl_kernel.linear beats torch's oneDNN bf16 matmul with the weights cold, as a
# decode step reads them (one pass over the weights); from about 128 rows (prefill) oneDNN's
# register tiling wins. Measured with benchmark/bench_kernels.py and whole decode steps
# (docs/benchmarks.md).
LINEAR_KERNEL_MAX_ROWS = 96


def linear_kernel_max_rows(onednn_rows: int = LINEAR_KERNEL_MAX_ROWS) -> int:
    """Rows up to which bf16 matmuls run on sgl_kernel.linear: `onednn_rows` where oneDNN has
    bf16 arithmetic to run the rest, every size elsewhere (torch's bf16 matmul without it is an
    emulation or a plain loop, slower than the kernel at every size: bench_kernels.py)."""
    return onednn_rows if cpu_has_bf16_arithmetic() else sys.maxsize


class BF16LinearKernel:
    """y = x W^T + b through sgl_kernel.linear, on W packed once (bias kept in float32)."""

    def __init__(self, ops: Any, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.ops = ops
        self.out_features = weight.shape[0]
        self.packed = ops.pack_linear_weight(weight)
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(self.packed.shape[0] * self.packed.shape[2], dtype=torch.float32)
            self.bias[: self.out_features] = bias.float()

    def __call__(self, x: torch.Tensor, out_float: bool = False) -> torch.Tensor:
        return self.ops.linear(x, self.packed, self.bias, self.out_features, out_float)


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
