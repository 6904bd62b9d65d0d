"""The native CPU kernels (the `sgl_kernel` package), switched on for a built model in one place.

`sgl_kernel_ops()` imports sgl_kernel once; None (with the reason logged once) when it is not
built. `use_cpu_kernels(model)` hands the ops to every layer that has a native CPU form
(RMSNorm, SiluAndMul, the rotary embedding, Linear and the logits processor, each through its
`use_cpu_kernels(ops)`), once, after the weights are loaded; the layers keep their plain-torch
forward for every input the kernels do not take, and the whole plain-torch model stays the
reference (`--attention-backend torch_native` runs it).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

from torch import nn

logger = logging.getLogger(__name__)


@functools.cache
def sgl_kernel_ops() -> Optional[Any]:
    """torch.ops.sgl_kernel, or None when the package is not built here."""
    try:
        import sgl_kernel
    except ImportError as exc:
        logger.info("sgl_kernel unavailable (%s)", exc)
        return None
    return sgl_kernel.ops


def cpu_kernels_isa() -> Optional[str]:
    """The instruction set the kernels run on here, or None without them."""
    ops = sgl_kernel_ops()
    return None if ops is None else ops.isa()


def use_cpu_kernels(model: nn.Module) -> int:
    """Switches the model's layers to the native kernels; returns how many layers switched."""
    ops = sgl_kernel_ops()
    if ops is None:
        return 0
    switched = 0
    # leaves first, then modules made of others: a decoder layer's fused decode form needs its
    # sublayers (the shared rotary embedding too) switched before it looks at them
    modules = sorted(model.named_modules(), key=lambda item: next(item[1].children(), None) is not None)
    for name, module in modules:
        if name.rpartition(".")[2] == "lm_head":
            continue  # only its weight is used, by the logits processor, which packs its own
        hook = getattr(module, "use_cpu_kernels", None)
        if hook is not None and hook(ops):
            switched += 1
    return switched
