"""The offline engine: `sglang.Engine(model_path=..., **server_args).generate(...)`.

Data flow: generate() -> TokenizerManager (validate, tokenize) -> Scheduler (continuous
batching; ModelRunner -> attention backend -> Sampler) -> DetokenizerManager (text) ->
TokenizerManager (result dicts). With one rank all of it runs in the caller's thread, stepping
the scheduler until the submitted requests finish. With --tknp-size and/or --tp-size > 1 the
engine starts the server's backend processes (controller, rank schedulers, detokenizer) and
drives the same TokenizerManager as the HTTP server, on an event loop in the caller's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Iterator, Optional, Union

import zmq
import zmq.asyncio

from sglang.srt.entrypoints.subprocesses import Backend
from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import AbortReq, BatchTokenIDOut, GenerateReqInput
from sglang.srt.managers.scheduler_builder import build_scheduler
from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager
from sglang.srt.model_loader import load_model_config_and_tokenizer
from sglang.srt.server_args import ServerArgs, check_rank_layout, sampling_defaults
from sglang.srt.utils import configure_logging

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, **kwargs: Any):
        args = ServerArgs.from_kwargs(**kwargs).resolve()
        if args.node_rank > 0:
            raise ValueError(
                "node_rank > 0 runs only that node's ranks: start it with `python -m sglang.launch_server "
                "--node-rank N ...`; the Engine runs on node 0"
            )
        configure_logging(args.log_level)
        self.server_args = args
        self.remote: Optional[_RemoteBackend] = None
        if args.world_size > 1:
            self.scheduler = None
            self.model_config, self.tokenizer = load_model_config_and_tokenizer(
                args.model_path, args.tokenizer_path, args.dtype, args.context_length, args.device
            )
            check_rank_layout(args, self.model_config)
        else:
            self.scheduler, self.model_config, self.tokenizer = build_scheduler(args)
        self.tokenizer_manager = TokenizerManager(
            self.tokenizer,
            self.model_config.vocab_size,
            self.model_config.context_len,
            args.random_seed,
            served_model_name=args.served_model_name or self.model_config.name,
            sampling_defaults=sampling_defaults(args, self.model_config),
            grammar_backend=args.grammar_backend,
        )
        self.detokenizer = DetokenizerManager(self.tokenizer)
        if args.world_size > 1:
            self.remote = _RemoteBackend(args, self.tokenizer_manager)
        load = self.remote.get_load() if self.remote else self.scheduler.get_load()
        logger.info(
            "engine ready: %s, KV cache %d tokens, %d max running requests",
            self.model_config.model_path,
            load.max_total_num_tokens,
            load.max_running_requests,
        )

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt: Optional[Union[str, list[str]]] = None,
        sampling_params: Optional[Union[dict, list[dict]]] = None,
        input_ids: Optional[Union[list[int], list[list[int]]]] = None,
        return_logprob: bool = False,
        logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: Optional[Union[str, list[str]]] = None,
    ) -> Union[dict, list[dict], Iterator[dict]]:
        """SGLang's result dicts: one for a single prompt with n == 1, else a list in prompt
        order (the n samples of a prompt together); a generator of cumulative chunks if `stream`."""
        obj = GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            rid=rid,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
            stream=stream,
        )
        if self.remote is not None:
            return self.remote.generate(obj)
        reqs = self.tokenizer_manager.tokenize(obj)
        states = [ReqState(r.rid, return_logprob, return_text_in_logprobs) for r in reqs]
        for req in reqs:
            self.scheduler.handle(req)
        if stream:
            return self._stream(states)
        for _ in self._run(states):
            pass
        results = [TokenizerManager.result(s) for s in states]
        return results if obj.is_batch or len(results) > 1 else results[0]

    def _run(self, states: list[ReqState]) -> Iterator[ReqState]:
        """Steps the scheduler until every state is finished, yielding each state that changed."""
        by_rid = {s.rid: s for s in states}
        try:
            while not all(s.finished for s in states):
                outputs = self.scheduler.step()
                if not outputs and not self.scheduler.has_work():
                    raise RuntimeError("the scheduler went idle with requests unfinished")
                for item in self.detokenizer.handle(BatchTokenIDOut(outputs)).outputs:
                    state = by_rid.get(item.out.rid)
                    if state is not None:
                        self.tokenizer_manager.update(state, item)
                        yield state
        finally:
            # A caller that stops iterating a stream abandons its requests: abort them.
            for s in states:
                if not s.finished:
                    self.scheduler.handle(AbortReq(s.rid, "the caller stopped reading the stream"))
                    self.detokenizer.forget(s.rid)

    def _stream(self, states: list[ReqState]) -> Iterator[dict]:
        for state in self._run(states):
            yield TokenizerManager.result(state)

    # ---- control -------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drops the prefix cache; False (nothing done) while requests are in flight."""
        if self.remote is not None:
            return self.remote.run(self.tokenizer_manager.flush_cache())
        return self.scheduler.flush_cache()

    def get_server_info(self) -> dict:
        load = self.remote.get_load() if self.remote else self.scheduler.get_load()
        return {**self.server_args.to_dict(), **dataclasses.asdict(load)}

    def shutdown(self) -> None:
        """Releases the model and KV memory (and stops the TKNP processes); the engine cannot
        be used afterwards."""
        self.scheduler = None
        if self.remote is not None:
            self.remote.shutdown()
            self.remote = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class _RemoteBackend:
    """The server's backend processes driven from a synchronous caller (more than one rank)."""

    def __init__(self, args: ServerArgs, tm: TokenizerManager):
        self.backend = Backend(args).start()
        self.loop = asyncio.new_event_loop()
        self.ctx = zmq.asyncio.Context()
        self.tm = tm
        self.run(self._attach())

    async def _attach(self) -> None:
        send = self.ctx.socket(zmq.PUSH)
        send.connect(self.backend.ipc["scheduler"])
        recv = self.ctx.socket(zmq.PULL)
        recv.bind(self.backend.ipc["tokenizer"])
        self.receiver = self.tm.attach(send, recv)
        self.watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """A backend process that died fails every request in flight (and every later one),
        instead of leaving the caller waiting forever; runs whenever the caller waits."""
        while (reason := self.backend.dead_process()) is None:
            await asyncio.sleep(0.5)
        logger.error("%s; failing in-flight requests", reason)
        self.tm.fail_all(reason)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def get_load(self) -> Any:
        return self.run(self.tm.get_load())

    def generate(self, obj: GenerateReqInput) -> Union[dict, list[dict], Iterator[dict]]:
        agen = self.tm.generate_request(obj)
        if obj.stream:
            return self._stream(agen)
        results = self.run(_collect(agen))
        return results if obj.is_batch or len(results) > 1 else results[0]

    def _stream(self, agen: Any) -> Iterator[dict]:
        try:
            while True:
                try:
                    _, result = self.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield result
        finally:
            self.run(agen.aclose())  # a caller that stops reading aborts the rest

    def shutdown(self) -> None:
        self.receiver.cancel()
        self.watchdog.cancel()
        self.run(asyncio.gather(self.receiver, self.watchdog, return_exceptions=True))
        self.ctx.destroy(linger=0)
        self.backend.shutdown()
        self.loop.close()


async def _collect(agen: Any) -> list[dict]:
    results = [item async for item in agen]
    return [r for _, r in sorted(results, key=lambda x: x[0])]
