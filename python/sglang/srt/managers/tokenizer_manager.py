"""The user-facing side of a generate call: validate and tokenize, then assemble results.

`GenerateReqInput` (io_struct) is SGLang's request shape (one prompt or a batch, text or token ids, one
sampling dict or one per prompt). `TokenizerManager.tokenize` checks it and turns it into one
`TokenizedGenerateReqInput` per sequence to generate (a prompt with n > 1 becomes n requests);
`ReqState` accumulates a request's outputs into SGLang's result dict.

In the server, `TokenizerManager` also talks to the scheduler and detokenizer processes
(`attach`): `generate_request` sends the tokenized requests and yields results as the
detokenizer's outputs arrive, which one background task receives and routes by request id.

Admission: with `max_queued_requests` set, a call that would leave more than that many requests
waiting raises `Overloaded` (HTTP 503 with Retry-After) before anything is sent. Waiting is
counted here, where every request passes: requests accepted and not finished beyond the backend's
`max_running_requests`. It is a lower bound of the schedulers' queues, which also hold requests
that KV memory, not the request limit, keeps waiting. `close` refuses every new call the same way
(shutdown), and `abort_all` ends the ones in flight.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

from sglang.srt.constrained.grammar_backend import grammar_key
from sglang.srt.managers.io_struct import (
    MAX_TOP_LOGPROBS_NUM,
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetLoadReq,
    GetLoadReqOutput,
    ReqStrOutput,
    RequestError,
    TokenizedGenerateReqInput,
    check_shape,
    decode,
    encode,
)
from sglang.srt.mem_cache.memory_pool import slots_needed
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils import new_request_id

_BIG_MESSAGE_BYTES = 256 * 1024
# How long a refused client should wait before retrying (the Retry-After header), in seconds.
_RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    """The server takes no new requests now: too many are waiting, or it is shutting down."""

    def __init__(self, message: str, retry_after: int = _RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


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
    # latency bookkeeping for /metrics (perf_counter times, seconds)
    last_token_at: Optional[float] = None
    ttft: Optional[float] = None
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
        sampling_defaults: Optional[dict[str, Any]] = None,
        kv_capacity: Optional[int] = None,
        page_size: int = 1,
        grammar_backend: str = "xgrammar",
        model_path: Optional[str] = None,
        max_running_requests: int = 0,
        max_queued_requests: Optional[int] = None,
        tool_call_parser: Optional[str] = None,
    ):
        """`sampling_defaults`: values for the sampling parameters a request omits (or sets to
        null); the engine's own defaults for those it does not name. `kv_capacity`: the KV
        slots of the smallest rank a request may be placed on (None: unchecked here); a prompt
        that cannot fit is rejected before it is sent, as the scheduler would abort it.
        `max_queued_requests`: the most requests (server side) that may wait beyond the
        `max_running_requests` the backend runs at once (None: no limit); more are Overloaded.
        `tool_call_parser`: the format chat completions parse tool calls in (None: no parsing)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_len = context_len
        self.served_model_name = served_model_name
        self.model_path = model_path  # also accepted as a model name by the OpenAI API
        self.chat_template = chat_template
        self.sampling_defaults = dict(sampling_defaults or {})
        self.kv_capacity = kv_capacity
        self.page_size = page_size
        self.grammar_backend = grammar_backend  # "none": constrained requests are rejected
        self._token_texts: dict[int, str] = {}
        self._rng = random.Random(random_seed)
        self.rid_to_state: dict[str, ReqState] = {}
        self._send = None
        self._control_replies: dict[type, asyncio.Queue] = {}
        self._control_locks: dict[type, asyncio.Lock] = {}
        self.dead_reason: Optional[str] = None  # set when a backend process died
        self.tool_call_parser = tool_call_parser
        # admission (server side): `closed_reason` set = refuse every new call
        self.max_running_requests = max_running_requests
        self.max_queued_requests = max_queued_requests
        self.closed_reason: Optional[str] = None
        self.metrics: Optional[Any] = None  # RequestMetrics (entrypoints/metrics.py) with --enable-metrics

    def tokenize(self, obj: GenerateReqInput) -> list[TokenizedGenerateReqInput]:
        check_shape(obj)
        prompts = obj.prompts()
        if not prompts:
            raise ValueError("text/input_ids must not be an empty batch")
        params_list = (
            obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise RequestError(
                f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts", "sampling_params"
            )
        rids = obj.rid if isinstance(obj.rid, list) else [obj.rid] * len(prompts)
        if len(rids) != len(prompts):
            raise RequestError(f"rid has {len(rids)} entries for {len(prompts)} prompts", "rid")
        reqs = []
        for prompt, params_dict, rid in zip(prompts, params_list, rids):
            input_ids = self._input_ids(prompt)
            params = SamplingParams.from_dict(self._with_defaults(params_dict))
            params.verify(self.vocab_size)
            if self.grammar_backend == "none" and grammar_key(params) is not None:
                raise ValueError("structured output is disabled (--grammar-backend none)")
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
                        logprob_start_len=_logprob_start_len(obj.logprob_start_len, params.max_new_tokens),
                        top_logprobs_num=obj.top_logprobs_num or 0,
                        stream=obj.stream,
                    )
                )
        return reqs

    def _with_defaults(self, params: Any) -> Any:
        if not self.sampling_defaults or not isinstance(params, (dict, type(None))):
            return params  # nothing to add, or not a dict: from_dict says what is wrong
        return {**self.sampling_defaults, **{k: v for k, v in (params or {}).items() if v is not None}}

    def _input_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("text must not be empty", "text")
            try:
                prompt.encode()
            except UnicodeEncodeError:  # a lone surrogate: not text any tokenizer can take
                raise RequestError("text must be valid Unicode (it holds a lone surrogate)", "text") from None
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise RequestError("input_ids must not be empty", "input_ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"input_ids must be integers in [0, {self.vocab_size})", "input_ids")
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
        top = obj.top_logprobs_num
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS_NUM:
            raise RequestError(
                f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS_NUM}], got {top}", "top_logprobs_num"
            )
        # What the scheduler reserves on arrival: the prompt and the first output token, in
        # whole pages. Checked here so that the client gets a 400, not an aborted result.
        need = slots_needed(0, n + 1, self.page_size)
        if self.kv_capacity is not None and need > self.kv_capacity:
            raise RequestError(
                f"the input ({n} tokens) needs {need} KV cache slots, more than the {self.kv_capacity} "
                "a rank's KV cache holds (--max-total-tokens)",
                "input_ids" if obj.input_ids is not None else "text",
            )

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
        self._time(state, out)

    def _time(self, state: ReqState, out: Any) -> None:
        """Latency bookkeeping of one output (see entrypoints/metrics.py for what is measured)."""
        now = time.perf_counter()
        if out.new_token_ids:
            if state.last_token_at is None:
                # a delta carrying only the first token was sent when it was sampled (streaming, or
                # a one-token result); a whole result was not, and the scheduler timed its first token
                whole = len(out.new_token_ids) > 1 and out.first_token_seconds is not None
                state.ttft = out.first_token_seconds if whole else now - state.created
                if self.metrics is not None:
                    self.metrics.observe_first_token(state.ttft)
            elif self.metrics is not None:
                self.metrics.observe_tokens(now - state.last_token_at, len(out.new_token_ids))
            state.last_token_at = now
        if state.finished and self.metrics is not None:
            self.metrics.observe_finished(
                now - state.created, state.ttft, out.completion_tokens, out.queue_seconds, out.tknp_rank
            )

    def _extend_logprobs(self, state: ReqState, item: ReqStrOutput) -> None:
        out, meta = item.out, state.meta_info
        with_text = state.return_text_in_logprobs
        meta.setdefault("input_token_logprobs", []).extend(self._entries(out.input_token_logprobs, with_text))
        meta.setdefault("output_token_logprobs", []).extend(self._entries(out.output_token_logprobs, with_text))
        meta.setdefault("input_top_logprobs", []).extend(self._tops(out.input_top_logprobs, with_text))
        meta.setdefault("output_top_logprobs", []).extend(self._tops(out.output_top_logprobs, with_text))

    def _token_text(self, token_id: int, with_text: bool) -> Optional[str]:
        if not with_text:
            return None
        # Cached: logprobs with text decode one token per entry (positions x top candidates),
        # on the event loop; at most one string per vocabulary entry.
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

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
        # What exists now (tokenizer, app, libraries) lives as long as the server: keep the
        # cyclic GC from rescanning it. Otherwise the full collections that a result with
        # logprobs (one list per position and candidate) triggers take ~5x as long as building it,
        # all on the event loop.
        gc.collect()
        gc.freeze()
        return asyncio.get_running_loop().create_task(self._receive_loop(recv_from_backend))

    async def _receive_loop(self, recv: Any) -> None:
        while True:
            data = await recv.recv()
            # A big message (logprobs over long prompts) is parsed in a thread and folded in one
            # request at a time, so that /health and other requests never wait behind all of it.
            big = len(data) > _BIG_MESSAGE_BYTES
            msg = await asyncio.to_thread(decode, data) if big else decode(data)
            if isinstance(msg, BatchStrOut):
                for item in msg.outputs:
                    state = self.rid_to_state.get(item.out.rid)
                    if state is not None:
                        self.update(state, item)
                        state.queue.put_nowait(state)
                    if big:
                        await asyncio.sleep(0)
            else:
                self._control_replies[type(msg)].put_nowait(msg)

    async def generate_request(self, obj: GenerateReqInput) -> AsyncIterator[tuple[int, dict]]:
        """Yields (index, cumulative result) as requests progress (only final results unless
        obj.stream); index is the position among the expanded requests, prompt-major.
        Validation errors raise ValueError before anything is sent."""
        if self.dead_reason:
            raise RuntimeError(self.dead_reason)
        reqs = self.tokenize(obj)
        self._admit(len(reqs))
        self._check_rids_free([req.rid for req in reqs])  # all of them before registering any
        queue: asyncio.Queue = asyncio.Queue()
        states = []
        for i, req in enumerate(reqs):
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

    def _check_rids_free(self, rids: list[str]) -> None:
        seen: set[str] = set()
        for rid in rids:
            if rid in seen:
                raise RequestError(f"rid {rid!r} appears more than once in the batch", "rid")
            if rid in self.rid_to_state:
                raise RequestError(f"rid {rid!r} is already in use", "rid")
            seen.add(rid)

    def _admit(self, num_reqs: int) -> None:
        """Raises Overloaded when the server is closed, or when `num_reqs` more requests would
        leave more than max_queued_requests waiting."""
        if self.closed_reason is not None:
            raise Overloaded(self.closed_reason)
        if self.max_queued_requests is None:
            return
        waiting = len(self.rid_to_state) + num_reqs - self.max_running_requests
        if waiting > self.max_queued_requests:
            raise Overloaded(
                f"the server is overloaded: {len(self.rid_to_state)} requests in flight, at most "
                f"{self.max_running_requests} running and {self.max_queued_requests} waiting; retry later"
            )

    def close(self, reason: str) -> None:
        """Refuses every new request from now on (Overloaded with `reason`): the server is stopping."""
        self.closed_reason = reason

    async def abort_all(self, message: str) -> None:
        """Asks the scheduler to end every request in flight with an abort `message`; each one's
        caller then gets what it generated so far, with that finish reason."""
        for rid in list(self.rid_to_state):
            await self._send.send(encode(AbortReq(rid, message)))

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
        self.end_all(reason)

    def end_all(self, reason: str) -> None:
        """Every in-flight request ends now, here, with an abort reason and what it has so far
        (the backend is not asked: it died, or did not answer `abort_all` in time)."""
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


def _logprob_start_len(requested: Optional[int], max_new_tokens: int) -> int:
    """-1 (output logprobs only) unless given; but a prefill-only request (max_new_tokens 0)
    that asks for logprobs without a window gets the whole prompt's, the only logprobs it can
    want (SGLang's frontend sends such a request for unconditional_likelihood_normalized and
    reads input_token_logprobs[0] of each answer)."""
    if requested is not None:
        return requested
    return 0 if max_new_tokens == 0 else -1
