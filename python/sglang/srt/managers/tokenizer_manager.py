"""The user-facing side of a generate call: validate and tokenize, then assemble results.

`GenerateReqInput` is SGLang's request shape (one prompt or a batch, text or token ids, one
sampling dict or one per prompt). `TokenizerManager.tokenize` checks it and turns it into one
`TokenizedGenerateReqInput` per sequence to generate (a prompt with n > 1 becomes n requests);
`ReqState` accumulates a request's outputs into SGLang's result dict.

In the server, `TokenizerManager` also talks to the scheduler and detokenizer processes
(`attach`): `generate_request` sends the tokenized requests and yields results as the
detokenizer's outputs arrive, which one background task receives and routes by request id.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetLoadReq,
    GetLoadReqOutput,
    ReqStrOutput,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils import new_request_id


@dataclass
class GenerateReqInput:
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[dict, list[dict]]] = None
    rid: Optional[Union[str, list[str]]] = None
    return_logprob: bool = False
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    def __post_init__(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text and input_ids must be given")

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def prompts(self) -> list[Union[str, list[int]]]:
        if self.text is not None:
            return self.text if self.is_batch else [self.text]
        return self.input_ids if self.is_batch else [self.input_ids]


@dataclass
class ReqState:
    """Everything returned so far for one request, and when it started."""

    rid: str
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    meta_info: dict = field(default_factory=dict)
    finished: bool = False
    created: float = field(default_factory=time.perf_counter)
    # server side: where to announce progress (the queue of the call that owns this request)
    index: int = 0
    queue: Optional[asyncio.Queue] = None


class TokenizerManager:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        context_len: int,
        random_seed: int,
        served_model_name: str = "default",
        chat_template: Optional[str] = None,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_len = context_len
        self.served_model_name = served_model_name
        self.model_path: Optional[str] = None  # also accepted as a model name by the OpenAI API
        self.chat_template = chat_template
        self._rng = random.Random(random_seed)
        self.rid_to_state: dict[str, ReqState] = {}
        self._send = None
        self._control_replies: dict[type, asyncio.Queue] = {}
        self._control_locks: dict[type, asyncio.Lock] = {}
        self.dead_reason: Optional[str] = None  # set when a backend process died

    def tokenize(self, obj: GenerateReqInput) -> list[TokenizedGenerateReqInput]:
        prompts = obj.prompts()
        if not prompts:
            raise ValueError("text/input_ids must not be an empty batch")
        params_list = (
            obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        rids = obj.rid if isinstance(obj.rid, list) else [obj.rid] * len(prompts)
        if len(rids) != len(prompts):
            raise ValueError(f"rid has {len(rids)} entries for {len(prompts)} prompts")
        reqs = []
        for prompt, params_dict, rid in zip(prompts, params_list, rids):
            input_ids = self._input_ids(prompt)
            params = SamplingParams.from_dict(params_dict)
            params.verify(self.vocab_size)
            params.normalize(self.tokenizer)
            self._check_lengths(input_ids, params, obj)
            base_rid = rid or new_request_id()
            for i in range(params.n):
                seed = params.sampling_seed if params.sampling_seed is not None else self._rng.randrange(1 << 62)
                reqs.append(
                    TokenizedGenerateReqInput(
                        rid=base_rid if params.n == 1 else f"{base_rid}-{i}",
                        input_ids=input_ids,
                        sampling_params=params,
                        seed=seed + i,
                        return_logprob=obj.return_logprob,
                        logprob_start_len=-1 if obj.logprob_start_len is None else obj.logprob_start_len,
                        top_logprobs_num=obj.top_logprobs_num or 0,
                        stream=obj.stream,
                    )
                )
        return reqs

    def _input_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("text must not be empty")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise ValueError("input_ids must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"input_ids must be integers in [0, {self.vocab_size})")
        return list(prompt)

    def _check_lengths(self, input_ids: list[int], params: SamplingParams, obj: GenerateReqInput) -> None:
        n = len(input_ids)
        if n >= self.context_len:
            raise ValueError(
                f"the input ({n} tokens) is longer than the model's context length ({self.context_len} tokens)"
            )
        if n + params.max_new_tokens > self.context_len:
            raise ValueError(
                f"requested {n + params.max_new_tokens} tokens ({n} input + {params.max_new_tokens} max_new_tokens), "
                f"more than the context length of {self.context_len} tokens"
            )
        lsl = obj.logprob_start_len
        if obj.return_logprob and lsl is not None and not -1 <= lsl < n:
            raise ValueError(f"logprob_start_len must be -1 or in [0, {n}) for this input, got {lsl}")
        if obj.top_logprobs_num is not None and obj.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {obj.top_logprobs_num}")

    # ---- results -------------------------------------------------------------------------

    def update(self, state: ReqState, item: ReqStrOutput) -> None:
        """Folds one output delta into the request's accumulated result."""
        out = item.out
        state.text += item.text_delta
        state.output_ids += out.new_token_ids
        meta = state.meta_info
        meta.update(
            id=state.rid,
            finish_reason=out.finished_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            e2e_latency=time.perf_counter() - state.created,
        )
        if state.return_logprob:
            self._extend_logprobs(state, item)
        state.finished = out.finished_reason is not None

    def _extend_logprobs(self, state: ReqState, item: ReqStrOutput) -> None:
        out, meta = item.out, state.meta_info
        with_text = state.return_text_in_logprobs
        meta.setdefault("input_token_logprobs", []).extend(self._entries(out.input_token_logprobs, with_text))
        meta.setdefault("output_token_logprobs", []).extend(self._entries(out.output_token_logprobs, with_text))
        meta.setdefault("input_top_logprobs", []).extend(self._tops(out.input_top_logprobs, with_text))
        meta.setdefault("output_top_logprobs", []).extend(self._tops(out.output_top_logprobs, with_text))

    def _token_text(self, token_id: int, with_text: bool) -> Optional[str]:
        return self.tokenizer.decode([token_id]) if with_text else None

    def _entries(self, pairs: list, with_text: bool) -> list[list]:
        return [[lp, tid, self._token_text(tid, with_text)] for lp, tid in pairs]

    def _tops(self, tops: list, with_text: bool) -> list:
        return [None if t is None else self._entries(list(zip(*t)), with_text) for t in tops]

    @staticmethod
    def result(state: ReqState) -> dict:
        return {"text": state.text, "output_ids": list(state.output_ids), "meta_info": dict(state.meta_info)}

    # ---- server side: the scheduler and detokenizer processes -----------------------------

    def attach(self, send_to_scheduler: Any, recv_from_backend: Any) -> asyncio.Task:
        """Connects to the backend sockets (zmq.asyncio) and starts routing their outputs."""
        self._send = send_to_scheduler
        self._control_replies = {FlushCacheReqOutput: asyncio.Queue(), GetLoadReqOutput: asyncio.Queue()}
        return asyncio.get_running_loop().create_task(self._receive_loop(recv_from_backend))

    async def _receive_loop(self, recv: Any) -> None:
        while True:
            msg = decode(await recv.recv())
            if isinstance(msg, BatchStrOut):
                for item in msg.outputs:
                    state = self.rid_to_state.get(item.out.rid)
                    if state is not None:
                        self.update(state, item)
                        state.queue.put_nowait(state)
            else:
                self._control_replies[type(msg)].put_nowait(msg)

    async def generate_request(self, obj: GenerateReqInput) -> AsyncIterator[tuple[int, dict]]:
        """Yields (index, cumulative result) as requests progress (only final results unless
        obj.stream); index is the position among the expanded requests, prompt-major.
        Validation errors raise ValueError before anything is sent."""
        if self.dead_reason:
            raise RuntimeError(self.dead_reason)
        reqs = self.tokenize(obj)
        queue: asyncio.Queue = asyncio.Queue()
        states = []
        for i, req in enumerate(reqs):
            if req.rid in self.rid_to_state:
                raise ValueError(f"rid {req.rid!r} is already in use")
            state = ReqState(req.rid, obj.return_logprob, obj.return_text_in_logprobs, index=i, queue=queue)
            self.rid_to_state[req.rid] = state
            states.append(state)
        try:
            for req in reqs:
                await self._send.send(encode(req))
            remaining = len(states)
            while remaining:
                state = await queue.get()
                if state.finished:
                    remaining -= 1
                if obj.stream or state.finished:
                    yield state.index, self.result(state)
        finally:
            for state in states:
                self.rid_to_state.pop(state.rid, None)
                if not state.finished and self.dead_reason is None:
                    # the caller went away (client disconnect): stop the work and free the KV
                    await self._send.send(encode(AbortReq(state.rid, "the client disconnected")))

    async def abort_request(self, rid: str) -> None:
        await self._send.send(encode(AbortReq(rid)))

    async def flush_cache(self) -> bool:
        return (await self._control(FlushCacheReq(), FlushCacheReqOutput)).success

    async def get_load(self) -> GetLoadReqOutput:
        return await self._control(GetLoadReq(), GetLoadReqOutput)

    async def _control(self, msg: Any, reply_type: type) -> Any:
        # one control exchange of a kind at a time, so each caller gets the reply to its own message
        async with self._control_locks.setdefault(reply_type, asyncio.Lock()):
            await self._send.send(encode(msg))
            return await self._control_replies[reply_type].get()

    def fail_all(self, reason: str) -> None:
        """A backend process died: every in-flight request ends now with an abort reason."""
        self.dead_reason = reason
        for state in list(self.rid_to_state.values()):
            state.finished = True
            state.meta_info.update(
                id=state.rid,
                finish_reason={"type": "abort", "message": reason},
                prompt_tokens=state.meta_info.get("prompt_tokens", 0),
                completion_tokens=len(state.output_ids),
                cached_tokens=state.meta_info.get("cached_tokens", 0),
            )
            state.queue.put_nowait(state)
