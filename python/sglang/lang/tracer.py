"""The constant prefix of a program: the text every run of it starts with, whatever its arguments.

`run_batch` sends this prefix to the server once before the batch, so that its KV is
cached and the concurrent programs all reuse it instead of each computing it. We find it by
running the program with placeholder arguments on a backend that generates nothing: the
text produced before the first gen, select or use of an argument is the prefix.
"""

from __future__ import annotations

from typing import Any

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglExpr, SglFunction, SglSamplingParams
from sglang.lang.program_state import ProgramState


class _StopTracing(Exception):
    """The program reached something that depends on its arguments or on the model."""


class _ArgumentPlaceholder(SglExpr):
    """Stands for an argument: appending it ends the prefix, and so does any other use."""

    def __init__(self, name: str):
        self.name = name

    def execute(self, executor: StreamExecutor) -> None:
        raise _StopTracing(self.name)

    def _stop(self, *args: Any, **kwargs: Any):
        raise _StopTracing(self.name)

    __str__ = __format__ = __bool__ = __len__ = __iter__ = __getitem__ = __contains__ = _stop
    __int__ = __float__ = __eq__ = __lt__ = __gt__ = __mul__ = __mod__ = _stop
    __hash__ = object.__hash__

    def __getattr__(self, attr: str):
        raise _StopTracing(self.name)


class _TracingBackend(BaseBackend):
    def __init__(self, backend: Any):
        self.chat_template = backend.get_chat_template()

    def get_chat_template(self):
        return self.chat_template

    def generate(self, s, sampling_params):
        raise _StopTracing("gen")

    def generate_stream(self, s, sampling_params):
        raise _StopTracing("gen")

    def select(self, s, choices, temperature, choices_method):
        raise _StopTracing("select")

    def cache_prefix(self, prefix: str) -> None:
        raise _StopTracing("fork")


def constant_prefix(program: SglFunction, backend: Any) -> str:
    """The text the program produces before anything that varies; "" if it cannot be traced."""
    executor = StreamExecutor(_TracingBackend(backend), SglSamplingParams())
    state = ProgramState(executor)
    arguments = {name: _ArgumentPlaceholder(name) for name in program.arg_names}
    arguments.update(program.bind_arguments)
    try:
        program.func(state, **arguments)
    except Exception:  # _StopTracing, or the program failing on a placeholder
        pass
    finally:
        executor.end()
    executor.sync()
    error = executor.error_
    if error is not None and not isinstance(error, _StopTracing):
        return ""
    return executor.text_
