"""The executor of one program: a worker thread that turns expressions into text.

`s += expr` (program_state.py) queues the expression and returns at once; the worker runs
expressions in order (constant text, role prefixes and suffixes from the chat template, one
server call per gen/select). Reading a variable waits for the worker to produce it, which is
what lets forked branches and batched programs run their server calls concurrently. The
worker never blocks without a bound: every server call has a timeout, and after an error it
skips what is queued, so whoever waits is released and sees the error.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import Counter
from typing import Any, Callable, Optional

from sglang.lang.chat_template import ChatTemplate
from sglang.lang.ir import (
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    as_expr,
)


class StreamExecutor:
    """The text, messages and variables of one program (or one fork branch), and its worker."""

    def __init__(
        self,
        backend: Any,
        default_params: SglSamplingParams,
        chat_template: Optional[ChatTemplate] = None,
        stream: bool = False,
    ):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.default_params = default_params
        self.chat_template = chat_template or backend.get_chat_template()
        self.stream = stream

        self.text_ = ""
        self.messages_: list[dict] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: Optional[str] = None
        self.cur_role_begin_pos = 0
        self.cur_role_suffix = ""
        self.fork_start_text_pos: Optional[int] = None
        self.error_: Optional[BaseException] = None
        self.is_finished = False

        self._pending: Counter[str] = Counter()  # variables queued or being generated
        self._program_thread: Optional[threading.Thread] = None  # the thread running the program function
        self._cond = threading.Condition()  # guards the fields above; notified on every change
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._worker = threading.Thread(target=self._work, name=f"sgl-program-{self.sid[:8]}", daemon=True)
        self._worker.start()

    # ---- called from the program's thread ----

    def submit(self, expr: Any) -> None:
        if self._ended:
            raise RuntimeError("this program state has ended; it takes no more expressions")
        expr = as_expr(expr)
        with self._cond:
            self._pending.update(_variable_names(expr))
        self._queue.put(expr)

    def _outside_running_program(self) -> bool:
        """True when called from another thread while the program function still runs
        (a streamed program): only then can more expressions still arrive."""
        thread = self._program_thread
        return thread is not None and thread is not threading.current_thread() and not self._ended

    def sync(self) -> None:
        """Wait until every queued expression has run (or was skipped after an error); from
        outside a streamed program, until the program is over."""
        if self._outside_running_program():
            self.wait_for_change(lambda: False)
        self._queue.join()

    def end(self) -> None:
        """No more expressions: the worker exits once the queue is done."""
        if not self._ended:
            self._ended = True
            self._queue.put(None)

    def get_var(self, name: str) -> Any:
        def ready() -> bool:
            if self.error_ is not None or self.is_finished:
                return True
            if self._pending[name]:
                return False
            return name in self.variables or not self._outside_running_program()

        with self._cond:
            self._cond.wait_for(ready)
            if name in self.variables and not self._pending[name]:
                return self.variables[name]
            if self.error_ is not None:
                raise self.error_
            raise KeyError(f"the program has no variable {name!r}")

    def set_var(self, name: str, value: Any) -> None:
        with self._cond:
            self.variables[name] = value
            self._cond.notify_all()

    def get_meta_info(self, name: str) -> Optional[dict]:
        self.get_var(name)
        return self.meta_info.get(name)

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict]:
        self.sync()
        return self.messages_

    def fork(self, size: int) -> list["StreamExecutor"]:
        self.sync()
        if self.error_ is not None:
            raise self.error_
        if size > 1 and self.text_:
            self.backend.cache_prefix(self.text_)  # the branches share this prefix's KV
        children = []
        for _ in range(int(size)):
            child = StreamExecutor(self.backend, self.default_params, self.chat_template, self.stream)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.cur_role, child.cur_role_begin_pos, child.cur_role_suffix = (
                self.cur_role,
                self.cur_role_begin_pos,
                self.cur_role_suffix,
            )
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        return children

    def wait_for_change(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: ready() or self.is_finished)

    # ---- the worker ----

    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is None:
                    break
                if self.error_ is None:
                    self._execute(expr)
            except BaseException as exc:
                self.record_error(exc)
            finally:
                self._queue.task_done()
        with self._cond:
            self.is_finished = True
            self._cond.notify_all()

    def record_error(self, exc: BaseException) -> None:
        with self._cond:
            if self.error_ is None:
                self.error_ = exc
            self._cond.notify_all()

    def _execute(self, expr: SglExpr) -> None:
        if isinstance(expr, SglExprList):
            for item in expr.expr_list:
                self._execute(item)
        elif isinstance(expr, SglConstantText):
            self._append(str(expr.value))
        elif isinstance(expr, SglGen):
            self._execute_gen(expr)
        elif isinstance(expr, SglSelect):
            self._execute_select(expr)
        elif isinstance(expr, SglRoleBegin):
            self._execute_role_begin(expr.role)
        elif isinstance(expr, SglRoleEnd):
            self._execute_role_end(expr.role)
        else:
            expr.execute(self)  # e.g. the tracer's argument placeholders

    def _append(self, text: str, name: Optional[str] = None, meta_info: Optional[dict] = None) -> None:
        with self._cond:
            self.text_ += text
            if name is not None:
                self.variables[name] = self.variables.get(name, "") + text
                if meta_info is not None:
                    self.meta_info[name] = meta_info
            self._cond.notify_all()

    def _finish_var(self, name: Optional[str], value: Any = None, meta_info: Optional[dict] = None) -> None:
        with self._cond:
            if name is not None:
                if value is not None:
                    self.variables[name] = value
                    self.meta_info[name] = meta_info
                self._pending[name] -= 1
            self._cond.notify_all()

    def _execute_gen(self, expr: SglGen) -> None:
        params = self.default_params.merged(expr.sampling_params, self.chat_template.stop_str)
        name = expr.name
        if not self.stream:
            text, meta_info = self.backend.generate(self, params)
            self._append(text)
            self._finish_var(name, text, meta_info)
            return
        if name is not None:
            with self._cond:
                self.variables[name] = ""
        for piece, meta_info in self.backend.generate_stream(self, params):
            self._append(piece, name, meta_info)
        self._finish_var(name)

    def _execute_select(self, expr: SglSelect) -> None:
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self._append(decision.decision)
        self._finish_var(expr.name, decision.decision, decision.meta_info)

    def _execute_role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"a {role!r} role cannot begin inside the {self.cur_role!r} role: roles do not nest")
        prefix, suffix = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self._append(prefix)
        self.cur_role, self.cur_role_begin_pos, self.cur_role_suffix = role, len(self.text_), suffix

    def _execute_role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"the {role!r} role ends but {self.cur_role!r} is the open role")
        content = self.text_[self.cur_role_begin_pos :].lstrip()
        self._append(self.cur_role_suffix)
        self.messages_.append({"role": role, "content": content})
        self.cur_role = None


def _variable_names(expr: SglExpr) -> list[str]:
    if isinstance(expr, SglExprList):
        return [n for e in expr.expr_list for n in _variable_names(e)]
    if isinstance(expr, (SglGen, SglSelect)) and expr.name is not None:
        return [expr.name]
    return []
