"""Native CPU kernels for the engine, as torch.ops.sgl_kernel.*.

`make` builds the library (libsgl_kernel_ops.so, beside this file) from ../../csrc with CMake
against the installed torch. Importing this package loads it; the kernels then run on the best
instruction set this CPU has (`isa()`), chosen at load: avx512_bf16, avx512, avx2 or generic.
`SGL_KERNEL_ISA` (read here, once) or `set_isa()` pick a lower one, e.g. to test every path.

The ops take raw tensors and write in place where their schema says so (`Tensor(a!)`); the
engine's layers call them through thin wrappers in sglang.srt.layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_LIBRARY = Path(__file__).with_name("libsgl_kernel_ops.so")
if not _LIBRARY.exists():
    raise ImportError(f"sgl_kernel is not built: {_LIBRARY} is missing (run `make` in the repository root)")
torch.ops.load_library(str(_LIBRARY))

ops = torch.ops.sgl_kernel


def isa() -> str:
    """The instruction set the kernels run on."""
    return ops.isa()


def supported_isas() -> list[str]:
    """Every instruction set this CPU can run the kernels on, best first."""
    return list(ops.supported_isas())


def set_isa(name: str) -> None:
    ops.set_isa(name)


def parallel_threads() -> int:
    """How many threads the ops run on: torch's thread count (1 if the build lacked OpenMP)."""
    return int(ops.parallel_threads())


def has_bf16_linear() -> bool:
    """Whether `linear` runs here (it needs the CPU's bf16 dot products)."""
    return bool(ops.has_bf16_linear())


if os.environ.get("SGL_KERNEL_ISA"):
    set_isa(os.environ["SGL_KERNEL_ISA"])
