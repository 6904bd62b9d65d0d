"""Scheduler: continuous batching on one rank.

Data flow of the engine: request -> (TKNP controller) -> Scheduler -> ModelRunner -> attention
backend -> Sampler -> detokenizer. Each `step`:
  1. admits messages (new requests, aborts, cache flushes);
  2. builds one batch: every running request that is decoding contributes one token; then
     unfinished prefill chunks and waiting requests (in policy order) fill the prefill token
     budget (`chunked_prefill_size`) as far as KV memory allows; when memory cannot give the
     decodes their slots, the newest requests are retracted (their KV goes to the prefix cache
     and they wait to be prefilled again);
  3. runs one forward, samples, and appends tokens (finish checks in `output_processor`);
  4. returns the outputs to send: a delta per streaming request, a whole result per finished one.

No request may end the process: an exception while handling one (admitting it, sampling it, its
logprobs, its stop strings, its output) ends that request, or when it cannot be told apart the
requests of the step's batch, with an "abort" finish reason that says "internal error" and
frees their KV. The forward itself still runs every step (under TKNP every rank must take part
in it), and requests are failed after it, locally. Only a broken invariant, a
`SchedulerInvariantError` (or an exception in the forward or the KV cache bookkeeping), ends
the process.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, Optional, Protocol

from sglang.srt.constrained.grammar_backend import Grammar, GrammarBackend, grammar_key
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.io_struct import (
    AbortReq,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetLoadReq,
    GetLoadReqOutput,
    ReqOutput,
    TokenizedGenerateReqInput,
)
from sglang.srt.managers.output_processor import OutputProcessor, internal_error
from sglang.srt.managers.schedule_batch import FinishReason, Req, ScheduleBatch, ScheduledReq
from sglang.srt.managers.schedule_policy import PrefillBudget, SchedulePolicy
from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Share of the not-yet-generated tokens of running requests that admission keeps in reserve;
# it starts high, decays as steps succeed, and jumps back up after a retraction.
_INIT_NEW_TOKEN_RATIO = 0.7
_MIN_NEW_TOKEN_RATIO = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
# With nothing to run but grammars compiling, a step waits this long for one to finish.
_GRAMMAR_IDLE_WAIT_S = 0.005


class SchedulerInvariantError(RuntimeError):
    """The scheduler's own state is broken: the process must not go on."""


class Forward(Protocol):
    """Runs one step's batch (None: this rank has nothing this step) and returns its logits:
    the model runner's own forward, or under TKNP the group's collective one, which every rank
    calls every step."""

    def __call__(self, batch: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]: ...

    @property
    def comm_seconds(self) -> float:
        """Time spent moving data between ranks (load reports; 0 where nothing is measured)."""
        ...

    @property
    def wait_seconds(self) -> float:
        """Time spent waiting for other ranks' messages to start arriving (load reports)."""
        ...

    @property
    def overlapped_steps(self) -> int:
        """Steps run as two micro-batches under two-batch overlap (load reports)."""
        ...


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        schedule_policy: str = "fcfs",
        chunked_prefill_size: Optional[int] = None,
        disable_radix_cache: bool = False,
        forward: Optional[Forward] = None,
        tknp_rank: int = 0,
        grammar_backend: Optional[GrammarBackend] = None,
        wait_for_grammars: bool = False,
    ):
        """`forward` defaults to the runner's; `tknp_rank` names this rank in load reports;
        without a `grammar_backend` (--grammar-backend none) constrained requests are aborted.
        `wait_for_grammars` (TP replicas): a step waits for the compiles of the grammars queued
        so far, since replicas must schedule the same batches and when a compile ends is up to
        each replica's own worker thread."""
        self.runner = runner
        self._forward = forward if forward is not None else runner
        self.tknp_rank = tknp_rank
        self.forward_seconds = 0.0
        self.kv = KVCacheManager(runner.req_to_token_pool, runner.allocator, runner.kv_pool, disable_radix_cache)
        self.policy = SchedulePolicy(schedule_policy, self.kv)
        self.chunked_prefill_size = chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else None
        self.max_running_requests = runner.plan.max_running_requests
        model_config = runner.model_config
        self.output = OutputProcessor(tokenizer, model_config.eos_token_ids, model_config.vocab_size, tknp_rank)
        self.grammar_backend = grammar_backend
        self.grammar_queue: list[Req] = []  # constrained requests whose grammar is compiling
        self.wait_for_grammars = wait_for_grammars
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # requests holding a req_to_token row
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        # cumulative counters for /metrics (and, received requests, for TKNP placement)
        self.num_received_reqs = 0
        self.num_prompt_tokens = 0
        self.num_cache_hit_tokens = 0
        self.num_generation_tokens = 0
        self.pending_outputs: list[ReqOutput] = []

    # ---- messages ------------------------------------------------------------------------

    def handle(self, msg: TokenizedGenerateReqInput | AbortReq | FlushCacheReq | GetLoadReq) -> Optional[Any]:
        """Applies one message; control requests return their reply."""
        if isinstance(msg, TokenizedGenerateReqInput):
            try:
                self._add_request(msg)
            except Exception as exc:  # a request the scheduler cannot take: it alone fails
                logger.exception("admitting request %s failed", msg.rid)
                self._reject(msg, internal_error(exc))
        elif isinstance(msg, AbortReq):
            self._abort(msg.rid, msg.message)
        elif isinstance(msg, FlushCacheReq):
            return FlushCacheReqOutput(self.flush_cache())
        elif isinstance(msg, GetLoadReq):
            return self.get_load()
        else:
            raise TypeError(f"scheduler got an unknown message {type(msg).__name__}")
        return None

    def get_load(self) -> GetLoadReqOutput:
        kv = self.kv
        return GetLoadReqOutput(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting) + len(self.grammar_queue),
            max_total_num_tokens=kv.total_tokens,
            kv_tokens_free=kv.allocator.available_size(),
            kv_tokens_cached=kv.tree.total_size(),
            kv_tokens_used=kv.used_tokens(),
            kv_tokens_pending=sum(r.fill_len for r in self.waiting)
            + sum(r.remaining_new_tokens() for r in self.waiting + self.running),
            num_received_reqs=self.num_received_reqs,
            max_running_requests=self.max_running_requests,
            num_retractions=self.num_retractions,
            cache_hit_tokens=self.num_cache_hit_tokens,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generation_tokens,
            weight_bytes=self.runner.plan.weight_bytes,
            forward_seconds=self.forward_seconds,
            tknp_comm_seconds=self._forward.comm_seconds,
            tknp_wait_seconds=self._forward.wait_seconds,
            tknp_overlapped_steps=self._forward.overlapped_steps,
            tknp_rank=self.tknp_rank,
        )

    def _add_request(self, msg: TokenizedGenerateReqInput) -> None:
        self.num_received_reqs += 1
        req = Req(
            rid=msg.rid,
            origin_input_ids=list(msg.input_ids),
            sampling_params=msg.sampling_params,
            seed=msg.seed,
            return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len,
            # the output top-k is clamped to the vocabulary by the sampler; the prompt's here
            top_logprobs_num=min(msg.top_logprobs_num, self.runner.model_config.vocab_size),
            stream=msg.stream,
        )
        need = self.kv.slots_needed(0, len(req.origin_input_ids) + 1)
        if need > self.kv.total_tokens:
            self._finish(
                req,
                FinishReason(
                    "abort",
                    message=(
                        f"the prompt needs {need} KV slots but this rank's KV cache holds {self.kv.total_tokens} tokens"
                    ),
                ),
            )
            return
        key = grammar_key(req.sampling_params)
        if key is None:
            self.waiting.append(req)
        elif self.grammar_backend is None:
            self._finish(req, FinishReason("abort", message="structured output is disabled (--grammar-backend none)"))
        else:
            req.grammar_future = self.grammar_backend.submit(key)
            self.grammar_queue.append(req)

    def _poll_grammars(self) -> None:
        """Moves the requests whose grammar has compiled to `waiting`, with a matcher each;
        fails those whose grammar did not compile. Waits for a compile only with `wait_for_grammars`."""
        if self.wait_for_grammars:
            wait([r.grammar_future for r in self.grammar_queue])
        for req in [r for r in self.grammar_queue if r.grammar_future.done()]:
            self.grammar_queue.remove(req)
            try:
                req.grammar = Grammar(req.grammar_future.result())
            except ValueError as exc:  # the compiler's message, naming the field
                self._finish(req, FinishReason("abort", message=str(exc)))
                continue
            except Exception as exc:
                logger.exception("compiling the grammar of request %s failed", req.rid)
                self._finish(req, internal_error(exc))
                continue
            req.grammar_future = None
            self.waiting.append(req)

    def _reject(self, msg: TokenizedGenerateReqInput, reason: FinishReason) -> None:
        """Answers a request that never became a Req (nothing was allocated for it)."""
        self.pending_outputs.append(_abort_output(msg.rid, reason, len(msg.input_ids), 0, 0))

    def _abort(self, rid: str, message: str) -> None:
        for queue in (self.grammar_queue, self.waiting, self.running):
            for req in list(queue):  # _finish removes it from the queue
                if req.rid == rid and not req.is_finished():
                    self._finish(req, FinishReason("abort", message=message))

    def flush_cache(self) -> bool:
        if self.running or self.waiting:
            return False
        return self.kv.flush()

    def has_work(self) -> bool:
        return bool(self.grammar_queue or self.waiting or self.running or self.pending_outputs)

    # ---- one step ------------------------------------------------------------------------

    def step(self, lockstep: bool = False) -> list[ReqOutput]:
        """One step; with `lockstep` (TKNP) the forward runs even for an empty batch, because
        every rank of the group takes part in every forward."""
        if self.grammar_queue:
            self._poll_grammars()
        batch = self._schedule()
        if not batch.is_empty() or lockstep:
            self._run(batch)
        elif self.grammar_queue and not self.pending_outputs:
            # nothing else to do: do not spin while grammars compile
            futures = [r.grammar_future for r in self.grammar_queue]
            wait(futures, timeout=_GRAMMAR_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        outputs, self.pending_outputs = self.pending_outputs, []
        return outputs

    def _schedule(self) -> ScheduleBatch:
        items = self._schedule_decodes()
        decoding = [it.req for it in items]
        budget = PrefillBudget(
            tokens=self.chunked_prefill_size or 1 << 62,
            reserved=self._decode_slots(decoding) + self._decode_reserve(decoding),
            page_size=self.kv.page_size,
        )
        # requests in the middle of a chunked prefill continue first
        for req in self.running:
            missing = req.fill_len - req.kv_len
            if missing > 1 or (missing == 1 and req.kv_len < len(req.origin_input_ids)):
                self._add_prefill(items, req, budget)
        # a copy: admitting a request removes it from self.waiting, which fcfs orders in place
        for req in list(self.policy.order(self.waiting)):
            if budget.tokens <= 0 or len(self.running) >= self.max_running_requests:
                break
            # Starting a request locks its cached prefix, whose part no running request locks yet
            # then no longer counts as evictable; admit it only if its whole remaining prefill
            # fits beside what is already promised.
            matched, newly_locked = self.kv.prefix_match(req)
            needed = self.kv.slots_needed(matched, req.fill_len)
            if self.kv.available_size() - newly_locked - budget.reserved < needed:
                if not self.running and not items:
                    self._finish(
                        req,
                        FinishReason(
                            "abort",
                            message=(
                                f"the request needs {req.fill_len} KV slots; this rank's KV cache holds {self.kv.total_tokens}"
                            ),
                        ),
                    )
                    continue
                break
            if not self.kv.start(req):
                break
            self.waiting.remove(req)
            self.running.append(req)
            req.mark_started()
            if not req.num_retractions:
                req.cached_tokens = req.prefix_len
                self.num_prompt_tokens += len(req.origin_input_ids)
                self.num_cache_hit_tokens += req.prefix_len
            self._add_prefill(items, req, budget)
        return ScheduleBatch([it for it in items if it.extend_len > 0])

    def _schedule_decodes(self) -> list[ScheduledReq]:
        while True:
            decoding = [r for r in self.running if self._is_decoding(r)]
            if not decoding or self.kv.available_size() >= self._decode_slots(decoding):
                break
            self._retract(decoding[-1])
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)
        return [ScheduledReq(r, 1, samples=True) for r in decoding]

    def _is_decoding(self, req: Req) -> bool:
        return req.kv_len >= len(req.origin_input_ids) and req.kv_len == req.fill_len - 1

    def _decode_slots(self, decoding: list[Req]) -> int:
        """Slots one decode step of these requests takes: a new page for each whose last is full."""
        return sum(self.kv.slots_needed(r.kv_len, r.kv_len + 1) for r in decoding)

    def _decode_reserve(self, decoding: list[Req]) -> int:
        """Slots kept for the tokens decoding requests are still to generate. Requests still in
        their prefill are left out, as they were when admitted: charging a partly prefilled
        request its own future tokens could hold back the rest of its prompt (with the slots it
        already has) until others finish; it joins the reserve once it decodes."""
        return int(self.new_token_ratio * sum(r.remaining_new_tokens() for r in decoding))

    def _add_prefill(self, items: list[ScheduledReq], req: Req, budget: PrefillBudget) -> None:
        missing = req.fill_len - req.kv_len
        # available_size is read after kv.start locked this request's prefix, which made it unevictable
        n = budget.take(req.kv_len, missing, self.kv.available_size())
        samples = n == missing and req.sampling_params.max_new_tokens > 0
        items.append(ScheduledReq(req, n, samples))

    def _retract(self, req: Req) -> None:
        """Frees a running request's KV (into the prefix cache) and sends it back to waiting."""
        self.kv.release(req)
        self.running.remove(req)
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        logger.info("retracted request %s to free KV memory (%d running)", req.rid, len(self.running))

    def forward(self, batch: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        start = time.perf_counter()
        try:
            return self._forward(batch)
        finally:
            self.forward_seconds += time.perf_counter() - start

    def _run(self, batch: ScheduleBatch) -> None:
        if batch.is_empty():
            self.forward(None)
            return
        slots = self.kv.alloc_extend([(it.req, it.extend_len) for it in batch.items])
        if slots is None:
            raise SchedulerInvariantError("KV allocation failed after the scheduler reserved memory (a scheduler bug)")
        logits = self.forward(batch.to_forward_batch(slots))
        for item in batch.items:
            item.req.kv_len += item.extend_len
            self.kv.cache_prompt(item.req)  # acts once, when the prompt has just been computed
        try:
            self._process(batch, logits)
        except SchedulerInvariantError:
            raise
        except Exception as exc:
            # The per-request guards missed it, so it cannot be told apart: the batch fails.
            logger.exception("handling a step's results failed; aborting its %d requests", len(batch.items))
            for req in batch.reqs:
                if not req.is_finished():
                    self._finish(req, internal_error(exc))

    def _process(self, batch: ScheduleBatch, logits: LogitsProcessorOutput) -> None:
        """Samples and appends the step's tokens; finishes requests (those that failed too)."""
        sampled, failed = self.output.sample_or_isolate(batch, logits)
        if sampled is not None:
            self.num_generation_tokens += len(sampled.next_token_ids) - len(failed)
        for req, reason in self.output.process(batch, logits, sampled, failed):
            if reason is not None:
                self._finish(req, reason)
            elif req.stream:
                self._emit(req)

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finished_reason = reason
        self._release(req)
        self._emit(req)

    def _release(self, req: Req) -> None:
        """Frees the request's KV and takes it out of the queues."""
        self.kv.release(req)
        for queue in (self.grammar_queue, self.waiting, self.running):
            if req in queue:
                queue.remove(req)

    def _emit(self, req: Req) -> None:
        """Queues the request's output delta; a request whose output cannot be built fails."""
        try:
            self.pending_outputs.append(self.output.make_output(req))
            return
        except Exception as exc:
            logger.exception("building the output of request %s failed", req.rid)
            reason = internal_error(exc)
        if not req.is_finished():
            self._release(req)
        req.finished_reason = reason
        # what could not be built stays out: the client gets the reason
        self.pending_outputs.append(
            _abort_output(req.rid, reason, len(req.origin_input_ids), len(req.output_ids), req.cached_tokens)
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.running)


def _abort_output(
    rid: str, reason: FinishReason, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> ReqOutput:
    """A final output with no tokens: the reason is all the client gets."""
    return ReqOutput(
        rid=rid,
        new_token_ids=[],
        finished_reason=reason.to_json(),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
    )
