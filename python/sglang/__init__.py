"""sglang (TKNP edition): an SGLang-compatible serving engine with token parallelism.

Heavy modules are imported on first use, so `import sglang` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "Engine": "sglang.srt.entrypoints.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sglang' has no attribute '{name}'")
