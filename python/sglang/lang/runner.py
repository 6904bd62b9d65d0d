"""Running programs: one (`fn.run`), streamed on its own thread, or a batch on a thread pool."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglFunction, SglSamplingParams
from sglang.lang.program_state import ProgramState

# run_batch pre-computes the KV of the programs' shared constant prefix when it is this long.
_MIN_PREFIX_CHARS_TO_CACHE = 64


def run_program(
    program: SglFunction,
    backend: Any,
    args: tuple,
    kwargs: dict,
    default_params: SglSamplingParams,
    stream: bool,
    raise_errors: bool = True,
) -> ProgramState:
    """Run one program. With `stream=True` it runs on its own thread and this returns at once."""
    state = ProgramState(StreamExecutor(backend, default_params, stream=stream))
    if stream:
        thread = threading.Thread(target=_run_function, args=(program, state, args, kwargs, False), daemon=True)
        state.stream_executor._program_thread = thread  # before it starts: readers must wait for it
        thread.start()
        return state
    state.stream_executor._program_thread = threading.current_thread()
    _run_function(program, state, args, kwargs, raise_errors)
    return state


def _run_function(program: SglFunction, state: ProgramState, args: tuple, kwargs: dict, raise_errors: bool) -> None:
    exe = state.stream_executor
    try:
        state.ret_value = program.func(state, *args, **kwargs)
    except BaseException as exc:
        exe.record_error(exc)
        if raise_errors:
            raise
    finally:
        exe.end()
    exe.sync()
    if raise_errors and exe.error_ is not None:
        raise exe.error_


def run_program_batch(
    program: SglFunction,
    backend: Any,
    batch_kwargs: list[dict],
    default_params: SglSamplingParams,
    num_threads: Any,
    progress_bar: bool,
) -> list[ProgramState]:
    """Run one program per argument set on a thread pool; a failed program's state holds its
    error (`state.error()`; reading its variables raises it)."""
    if not batch_kwargs:
        return []
    if len(batch_kwargs) > 1:
        from sglang.lang.tracer import constant_prefix

        prefix = constant_prefix(program, backend)
        if len(prefix) > _MIN_PREFIX_CHARS_TO_CACHE:
            backend.cache_prefix(prefix)
    if num_threads == "auto":
        num_threads = max(96, multiprocessing.cpu_count() * 16)
    num_threads = max(1, min(int(num_threads), len(batch_kwargs)))
    bar = None
    if progress_bar:
        import tqdm

        bar = tqdm.tqdm(total=len(batch_kwargs))
    with ThreadPoolExecutor(num_threads, thread_name_prefix="sgl-batch") as pool:
        futures = [
            pool.submit(run_program, program, backend, (), kw, default_params, False, False) for kw in batch_kwargs
        ]
        if bar is not None:
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
        states = [f.result() for f in futures]
    if bar is not None:
        bar.close()
    return states
