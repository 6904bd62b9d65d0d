"""The offline engine: `sglang.Engine(model_path=..., **server_args).generate(...)`.

Data flow: generate() -> TokenizerManager (validate, tokenize) -> Scheduler (continuous
batching; ModelRunner -> attention backend -> Sampler) -> DetokenizerManager (text) ->
TokenizerManager (result dicts). Here all of it runs in the caller's thread, stepping the
scheduler until the submitted requests finish.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Optional, Union

from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import AbortReq, BatchTokenIDOut
from sglang.srt.managers.scheduler_process import build_scheduler
from sglang.srt.managers.tokenizer_manager import GenerateReqInput, ReqState, TokenizerManager
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import configure_logging

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, **kwargs: Any):
        args = ServerArgs.from_kwargs(**kwargs).resolve()
        configure_logging(args.log_level)
        self.server_args = args
        self.scheduler, self.model_config, self.tokenizer = build_scheduler(args)
        self.tokenizer_manager = TokenizerManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.context_len, args.random_seed
        )
        self.detokenizer = DetokenizerManager(self.tokenizer)
        load = self.scheduler.get_load()
        logger.info(
            "engine ready: %s, KV cache %d tokens, %d max running requests",
            self.model_config.model_path, load.max_total_num_tokens, load.max_running_requests,
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
        return self.scheduler.flush_cache()

    def get_server_info(self) -> dict:
        return {**self.server_args.to_dict(), **dataclasses.asdict(self.scheduler.get_load())}

    def shutdown(self) -> None:
        """Releases the model and KV memory; the engine cannot be used afterwards."""
        self.scheduler = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
