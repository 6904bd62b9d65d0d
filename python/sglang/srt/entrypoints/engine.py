"""The offline engine: `sglang.Engine(model_path=..., **server_args).generate(...)`.

Data flow: generate() -> TokenizerManager (validate, tokenize) -> Scheduler (continuous
batching; ModelRunner -> attention backend -> Sampler) -> DetokenizerManager (text) ->
TokenizerManager (result dicts). Here all of it runs in the caller's thread, stepping the
scheduler until the submitted requests finish.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Union

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import AbortReq, BatchTokenIDOut
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.tokenizer_manager import GenerateReqInput, ReqState, TokenizerManager
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_loader import load_tokenizer, resolve_model_path
from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, **kwargs: Any):
        args = ServerArgs.from_kwargs(**kwargs).resolve()
        logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
        self.server_args = args
        model_path = resolve_model_path(args.model_path)
        self.model_config = ModelConfig.from_path(model_path, args.dtype, args.context_length, args.device)
        self.tokenizer = load_tokenizer(model_path, args.tokenizer_path)
        runner = ModelRunner(
            self.model_config,
            device=args.device,
            attention_backend=args.attention_backend,
            mem_fraction_static=args.mem_fraction_static,
            max_total_tokens=args.max_total_tokens,
            max_running_requests=args.max_running_requests,
        )
        self.scheduler = Scheduler(
            runner,
            self.tokenizer,
            schedule_policy=args.schedule_policy,
            chunked_prefill_size=args.chunked_prefill_size,
            disable_radix_cache=args.disable_radix_cache,
        )
        self.tokenizer_manager = TokenizerManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.context_len, args.random_seed
        )
        self.detokenizer = DetokenizerManager(self.tokenizer)
        logger.info(
            "engine ready: %s, KV cache %d tokens, %d max running requests",
            model_path, runner.plan.max_total_tokens, runner.plan.max_running_requests,
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
            self.detokenizer.register(req.rid, req.sampling_params.stop)
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
        return self.scheduler.flush_cache()

    def get_server_info(self) -> dict:
        kv = self.scheduler.kv
        return {
            **self.server_args.to_dict(),
            "max_total_num_tokens": kv.total_tokens,
            "kv_tokens_free": kv.allocator.available_size(),
            "kv_tokens_cached": kv.tree.total_size(),
            "max_running_requests": self.scheduler.max_running_requests,
        }

    def shutdown(self) -> None:
        """Releases the model and KV memory; the engine cannot be used afterwards."""
        self.scheduler = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
