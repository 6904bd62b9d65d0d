"""A stand-in for CUDA graph capture on CPU (the `graphs` argument of ModelRunner and
TknpModelRunner).

A CUDA graph replays the kernels its capture recorded, on the same tensors, writing its outputs
into the tensors the capture returned. `EagerGraphs` replays by running the captured function
again, on the same static inputs, and copying its result into the tensors the capture returned.
That checks everything around a graph on CPU: static buffers, padding, the attention backend's
re-planning into fixed buffers, fixed split sizes for collectives inside the graph, the ranks
capturing and replaying in step. What it cannot check is CUDA's capture itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def _copy_into(static: Any, fresh: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif dataclasses.is_dataclass(static):
        for f in dataclasses.fields(static):
            _copy_into(getattr(static, f.name), getattr(fresh, f.name))
    elif isinstance(static, (tuple, list)):
        for s, x in zip(static, fresh, strict=True):
            _copy_into(s, x)
    else:
        assert static == fresh, (static, fresh)  # None, or a plain value the graph fixed


class EagerGraphs:
    def __init__(self) -> None:
        self.num_captures = 0

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        out = fn()
        self.num_captures += 1
        return (lambda: _copy_into(out, fn())), out
