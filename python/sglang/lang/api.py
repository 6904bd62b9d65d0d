"""The public names of the frontend language (`import sglang as sgl; sgl.gen(...)`).

Signatures follow SGLang's `sglang.lang.api`, so programs written for SGLang run unchanged.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

from sglang.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sglang.lang.ir import (
    SglExpr,
    SglExprList,
    SglFunction,
    SglGen,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    as_expr,
    json_schema_str,
)

# The backend programs use when run() gets none. One per process, as in SGLang.
_default_backend: Any = None


def function(func: Optional[Callable] = None, **_unused: Any):
    """Decorator: `@sgl.function` (or `@sgl.function()`) turns `f(s, ...)` into a program."""
    if func is not None:
        return SglFunction(func)
    return SglFunction


def set_default_backend(backend: Any) -> None:
    global _default_backend
    _default_backend = backend


def get_default_backend() -> Any:
    return _default_backend


def _endpoint(backend: Any) -> Any:
    backend = backend or _default_backend
    return getattr(backend, "endpoint", backend)  # a Runtime stands for its endpoint


def flush_cache(backend: Any = None) -> bool:
    """Drop the server's prefix cache; False when there is no backend."""
    backend = _endpoint(backend)
    return False if backend is None else backend.flush_cache()


def get_server_info(backend: Any = None) -> Optional[dict]:
    backend = _endpoint(backend)
    return None if backend is None else backend.get_server_info()


def Runtime(*args: Any, **kwargs: Any):
    """Start a local server; see sglang.lang.backend.runtime.Runtime."""
    from sglang.lang.backend.runtime import Runtime as _Runtime

    return _Runtime(*args, **kwargs)


def gen(
    name: Optional[str] = None,
    max_tokens: Optional[int] = None,
    min_tokens: Optional[int] = None,
    stop: Optional[Union[str, list[str]]] = None,
    stop_token_ids: Optional[list[int]] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    presence_penalty: Optional[float] = None,
    ignore_eos: Optional[bool] = None,
    return_logprob: Optional[bool] = None,
    logprob_start_len: Optional[int] = None,
    top_logprobs_num: Optional[int] = None,
    return_text_in_logprobs: Optional[bool] = None,
    dtype: Optional[Union[type, str]] = None,
    choices: Optional[list[str]] = None,
    choices_method: Optional[ChoicesSamplingMethod] = None,
    regex: Optional[str] = None,
    json_schema: Optional[Union[str, dict]] = None,
) -> SglExpr:
    """Generate text into variable `name`. Unset arguments take the defaults given to run().
    With `choices`, this is `select`."""
    if choices:
        return SglSelect(
            name, choices, 0.0 if temperature is None else temperature, choices_method or token_length_normalized
        )
    if regex is not None:
        re.compile(regex)  # a malformed pattern fails here, not on the server
    return SglGen(
        name,
        {
            "max_new_tokens": max_tokens,
            "min_new_tokens": min_tokens,
            "stop": stop,
            "stop_token_ids": stop_token_ids,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty,
            "ignore_eos": ignore_eos,
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
            "return_text_in_logprobs": return_text_in_logprobs,
            "dtype": dtype,
            "regex": regex,
            "json_schema": json_schema_str(json_schema),
        },
    )


def gen_int(name: Optional[str] = None, **kwargs: Any) -> SglExpr:
    """gen() constrained to an integer (needs structured output on the server)."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, **kwargs: Any) -> SglExpr:
    """gen() constrained to a JSON string literal, quotes included: json.loads(value) is the
    string once it is complete (needs structured output on the server)."""
    return gen(name, dtype=str, **kwargs)


def select(
    name: Optional[str] = None,
    choices: Optional[list[str]] = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> SglExpr:
    """Append whichever of `choices` the model finds most likely here; store it in `name`."""
    if choices is None:
        raise ValueError("select needs choices")
    return SglSelect(name, choices, temperature, choices_method)


def _role(role: str, expr: Any = None) -> SglExprList:
    if expr is None:
        return SglExprList([SglRoleBegin(role), SglRoleEnd(role)])
    return SglExprList([SglRoleBegin(role), as_expr(expr), SglRoleEnd(role)])


def system(expr: Any = None) -> SglExprList:
    return _role("system", expr)


def user(expr: Any = None) -> SglExprList:
    return _role("user", expr)


def assistant(expr: Any = None) -> SglExprList:
    return _role("assistant", expr)


def system_begin() -> SglRoleBegin:
    return SglRoleBegin("system")


def system_end() -> SglRoleEnd:
    return SglRoleEnd("system")


def user_begin() -> SglRoleBegin:
    return SglRoleBegin("user")


def user_end() -> SglRoleEnd:
    return SglRoleEnd("user")


def assistant_begin() -> SglRoleBegin:
    return SglRoleBegin("assistant")


def assistant_end() -> SglRoleEnd:
    return SglRoleEnd("assistant")
