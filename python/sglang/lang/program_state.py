"""ProgramState, the `s` of a program, and ProgramStateGroup, what `s.fork(n)` returns."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglExpr, SglExprList, SglRoleBegin, SglRoleEnd, as_expr


class ProgramState:
    """The `s` of a program: `s += expr`, `s["name"]`, `s.text()`, `s.fork(n)`, ..."""

    def __init__(self, stream_executor: StreamExecutor):
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> "ProgramState":
        self.stream_executor.submit(other)
        return self

    def _role(self, role: str, expr: Any = None):
        if expr is not None:
            self.stream_executor.submit(SglExprList([SglRoleBegin(role), as_expr(expr), SglRoleEnd(role)]))
            return None

        @contextmanager
        def scope():
            self.stream_executor.submit(SglRoleBegin(role))
            yield
            self.stream_executor.submit(SglRoleEnd(role))

        return scope()

    def system(self, expr: Any = None):
        return self._role("system", expr)

    def user(self, expr: Any = None):
        return self._role("user", expr)

    def assistant(self, expr: Any = None):
        return self._role("assistant", expr)

    def fork(self, size: int = 1) -> "ProgramStateGroup":
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self) -> Iterator["ProgramState"]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> Optional[BaseException]:
        self.stream_executor.sync()
        return self.stream_executor.error_

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Optional[dict]:
        return self.stream_executor.get_meta_info(name)

    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """The text (or one variable) piece by piece as it is produced; with `stream=False`,
        one piece once it is complete."""
        exe = self.stream_executor
        if not exe.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        if var_name is None:

            def current() -> str:
                return exe.text_

            def complete() -> bool:
                return exe.is_finished
        else:

            def current() -> str:
                value = exe.variables.get(var_name, "")
                return value if isinstance(value, str) else ""

            def complete() -> bool:
                return var_name in exe.variables and not exe._pending[var_name]

        seen = 0
        while True:
            exe.wait_for_change(lambda: len(current()) > seen or complete())
            with exe._cond:
                piece, done = current()[seen:], complete() or exe.is_finished
            seen += len(piece)
            if piece:
                yield piece
            if done:
                break
        if exe.error_ is not None:
            raise exe.error_

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def __del__(self):
        self.stream_executor.end()

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """What `s.fork(n)` returns: index or iterate the branches, `+=` to all, `join()`."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState):
        self.states = states
        self.src_state = src_state
        self._inherited = set(src_state.stream_executor.variables)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "ProgramStateGroup":
        """An expression for every branch; a list (one each); or a function of the branch index."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} branches")
            items = list(other)
        elif callable(other) and not isinstance(other, SglExpr):
            items = [other(i) for i in range(len(self.states))]
        else:
            items = [other] * len(self.states)
        for state, item in zip(self.states, items):
            state += item
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every branch. `gather_variable`: each variable the branches created becomes
        a list (one value per branch) in the source state. `concate_and_append`: the text each
        branch added is appended to the source state, in branch order."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        for state in self.states:
            state.stream_executor.end()
            state.stream_executor.sync()
        errors = [s.stream_executor.error_ for s in self.states if s.stream_executor.error_ is not None]
        if errors:
            raise errors[0]
        src = self.src_state.stream_executor
        if mode == "gather_variable":
            names = dict.fromkeys(
                n for st in self.states for n in st.stream_executor.variables if n not in self._inherited
            )
            for name in names:
                src.set_var(name, [s.stream_executor.variables.get(name) for s in self.states])
        else:
            added = "".join(s.stream_executor.text_[s.stream_executor.fork_start_text_pos :] for s in self.states)
            self.src_state += added
