"""The frontend's intermediate representation: sampling parameters, expressions, functions.

A program is a Python function `f(s, ...)`; each `s += expr` hands one expression to the
program's executor (interpreter.py), which turns it into text and server calls. Expressions
are plain data: constant text, `gen`, `select`, role begin/end, and lists of those (what `+`
between expressions builds).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable, Optional, Union

# Patterns `gen(dtype=...)` / `gen_int` send as `regex` (constrained decoding on the server).
# A str is a JSON string literal, so that json.loads reads every complete one (SGLang's
# `"[\w\d\s]*"` refuses punctuation, and lets through raw tabs and newlines, which JSON does not).
JSON_STRING_REGEX = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
DTYPE_REGEX = {
    int: r"[-+]?[0-9]+",
    float: r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)",
    bool: r"(True|False)",
    str: JSON_STRING_REGEX,
}
# Numbers end at whitespace, so these stop strings keep the text parseable.
_DTYPE_STOP = {int: (" ", "\n"), float: (" ", "\n")}


@dataclasses.dataclass
class SglSamplingParams:
    """Defaults come from `fn.run(...)`; each `gen(...)` overrides the fields it sets."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: Union[str, list[str], tuple] = ()
    stop_token_ids: Union[list[int], tuple] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: Optional[bool] = None
    dtype: Optional[Union[type, str]] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None

    def merged(self, overrides: dict[str, Any], extra_stop: tuple[str, ...] = ()) -> "SglSamplingParams":
        """These defaults with `overrides` applied, plus `extra_stop` (the chat template's stop)."""
        params = dataclasses.replace(self, **overrides)
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop)
        dtype = _dtype_type(params.dtype)
        if dtype is not None:
            params.regex = DTYPE_REGEX[dtype]
            stop += _DTYPE_STOP.get(dtype, ())
        params.stop = stop + [s for s in extra_stop if s not in stop]
        return params

    def to_srt_kwargs(self) -> dict[str, Any]:
        """The `sampling_params` of a /generate request: every key, always (as SGLang sends it)."""
        return {
            "skip_special_tokens": True,
            "spaces_between_special_tokens": True,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "n": self.n,
            "stop": list(self.stop) if not isinstance(self.stop, str) else self.stop,
            "stop_token_ids": list(self.stop_token_ids),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
            "regex": self.regex,
            "json_schema": self.json_schema,
        }

    def logprob_fields(self) -> dict[str, Any]:
        """The top-level /generate fields about logprobs, only those that are set."""
        names = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def _dtype_type(dtype: Optional[Union[type, str]]) -> Optional[type]:
    if dtype is None:
        return None
    by_name = {"int": int, "float": float, "bool": bool, "str": str}
    resolved = by_name.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in DTYPE_REGEX:
        raise ValueError(f"gen(dtype=...) must be one of int, float, bool, str, got {dtype!r}")
    return resolved


def json_schema_str(schema: Any) -> Optional[str]:
    """`json_schema` travels as a string; a dict is serialized for the caller."""
    if schema is None or isinstance(schema, str):
        return schema
    return json.dumps(schema)


class SglExpr:
    """Anything `s += ...` accepts; `a + b` concatenates into an SglExprList."""

    def __add__(self, other: Any) -> "SglExprList":
        return SglExprList(_flatten(self) + _flatten(as_expr(other)))

    def __radd__(self, other: Any) -> "SglExprList":
        return SglExprList(_flatten(as_expr(other)) + _flatten(self))


def as_expr(value: Any) -> SglExpr:
    """`value` as an expression: a str becomes constant text."""
    if isinstance(value, SglExpr):
        return value
    if isinstance(value, str):
        return SglConstantText(value)
    if value is None:
        raise ValueError("None is not text: a program takes str or sgl expressions")
    raise TypeError(f"a program takes str or sgl expressions, got {type(value).__name__}")


def _flatten(expr: SglExpr) -> list[SglExpr]:
    return list(expr.expr_list) if isinstance(expr, SglExprList) else [expr]


class SglExprList(SglExpr):
    def __init__(self, expr_list: list[SglExpr]):
        self.expr_list = expr_list

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


class SglConstantText(SglExpr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglGen(SglExpr):
    """Generate text into variable `name`; `sampling_params` holds only what the caller set."""

    def __init__(self, name: Optional[str], sampling_params: dict[str, Any]):
        self.name = name
        self.sampling_params = {k: v for k, v in sampling_params.items() if v is not None}

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    """Pick one of `choices` by the server's prompt logprobs (see backend.select)."""

    def __init__(self, name: Optional[str], choices: list[str], temperature: float, choices_method: Any):
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"select needs a non-empty list of non-empty strings, got {choices!r}")
        self.name = name
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglFunction:
    """What `@sgl.function` makes: `run` executes one program, `run_batch` many concurrently."""

    def __init__(self, func: Callable, bind_arguments: Optional[dict[str, Any]] = None):
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].name != "s":
            raise TypeError(f"an sgl.function's first parameter must be 's' (the program state): {func.__name__}")
        self.func = func
        self.bind_arguments = dict(bind_arguments or {})
        self.arg_names = [p.name for p in params[1:]]
        self.__name__ = getattr(func, "__name__", "sgl_function")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__} has no parameter(s) {sorted(unknown)}")
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, stream: bool = False, backend: Any = None, **kwargs: Any):
        """Run the program once; the keyword arguments of SglSamplingParams set its gen defaults."""
        from sglang.lang.runner import run_program

        params, kwargs = _split_sampling_kwargs(kwargs)
        return run_program(self, _backend_or_default(backend), args, {**self.bind_arguments, **kwargs}, params, stream)

    def run_batch(
        self,
        batch_kwargs: list,
        *,
        backend: Any = None,
        num_threads: Union[str, int] = "auto",
        progress_bar: bool = False,
        **sampling_kwargs: Any,
    ):
        """Run the program once per argument set, concurrently; returns the states in order."""
        from sglang.lang.runner import run_program_batch

        params, unknown = _split_sampling_kwargs(sampling_kwargs)
        if unknown:
            raise TypeError(f"run_batch got unexpected keyword arguments {sorted(unknown)}")
        batch = [self._as_kwargs(a) for a in batch_kwargs]
        batch = [{**self.bind_arguments, **kw} for kw in batch]
        return run_program_batch(self, _backend_or_default(backend), batch, params, num_threads, progress_bar)

    def _as_kwargs(self, arguments: Any) -> dict[str, Any]:
        if isinstance(arguments, dict):
            return arguments
        if isinstance(arguments, (list, tuple)) and len(arguments) <= len(self.arg_names):
            return dict(zip(self.arg_names, arguments))
        raise TypeError(f"run_batch: {arguments!r} does not match the parameters {self.arg_names} of {self.__name__}")

    def __call__(self, *args: Any, **kwargs: Any):
        return self.run(*args, **kwargs)


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SglSamplingParams)} - {"dtype", "regex", "json_schema"}


def _split_sampling_kwargs(kwargs: dict[str, Any]) -> tuple[SglSamplingParams, dict[str, Any]]:
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_FIELDS}
    return SglSamplingParams(**sampling), kwargs


def _backend_or_default(backend: Any) -> Any:
    from sglang.lang.api import get_default_backend

    backend = backend or get_default_backend()
    if backend is None:
        raise ValueError("no backend: call sgl.set_default_backend(sgl.RuntimeEndpoint(url)) or pass backend=")
    return getattr(backend, "endpoint", backend)  # a Runtime stands for its endpoint
