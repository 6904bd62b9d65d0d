"""sglang (TKNP edition): an SGLang-compatible serving engine with token parallelism.

Heavy modules are imported on first use, so `import sglang` stays cheap; the frontend
language (`sgl.function`, `sgl.gen`, ...) never imports torch.
"""

__version__ = "0.1.0"

_FRONTEND_API = (
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "select",
    "system",
    "user",
    "assistant",
    "system_begin",
    "system_end",
    "user_begin",
    "user_end",
    "assistant_begin",
    "assistant_end",
    "set_default_backend",
    "get_default_backend",
    "flush_cache",
    "get_server_info",
    "Runtime",
)
_CHOICES = ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized")

_LAZY = {
    "Engine": "sglang.srt.entrypoints.engine",
    "RuntimeEndpoint": "sglang.lang.backend.runtime_endpoint",
    "ServerError": "sglang.lang.http_client",
    "ProgramState": "sglang.lang.program_state",
    **{name: "sglang.lang.api" for name in _FRONTEND_API},
    **{name: "sglang.lang.choices" for name in _CHOICES},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sglang' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
