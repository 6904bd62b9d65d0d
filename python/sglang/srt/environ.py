"""The environment variables the server reads, all of them, typed and documented here.

Code asks `read_environ()` rather than os.environ, at the moment it needs a value (not at
import time), so that a test can monkeypatch a variable and a process sees what was set
when it started the work.

Variables:
  SGLANG_TKNP_CACHE_DIR  Where to keep artifacts derived from checkpoints, e.g. the config
                         and tokenizer that transformers converts from a GGUF file's header
                         (seconds of work per start otherwise). Default: ~/.cache/sglang-tknp.

Read by the sgl_kernel package itself, once, when it loads (not here):
  SGL_KERNEL_ISA         Run the native CPU kernels on a lower instruction set than the best
                         this CPU has: avx512_bf16, avx512, avx2 or generic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sglang-tknp")


@dataclass(frozen=True)
class Environ:
    cache_dir: str  # SGLANG_TKNP_CACHE_DIR, absolute, "~" expanded

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Environ:
        cache_dir = env.get("SGLANG_TKNP_CACHE_DIR") or DEFAULT_CACHE_DIR
        return cls(cache_dir=os.path.abspath(os.path.expanduser(cache_dir)))


def read_environ() -> Environ:
    """The variables as this process's environment sets them now."""
    return Environ.from_mapping(os.environ)
