"""After a forward: sampling, logprob bookkeeping, finish checks, and the outputs to send.

A request with a grammar samples only the tokens its grammar allows, and its matcher accepts
each sampled token before the finish checks. Finish order follows SGLang: the length limit first,
then the end of the grammar, then stop token ids (always), EOS (unless
ignore_eos), then stop strings, which are matched on the decoded tail of the output. Before
`min_new_tokens` is reached, EOS and stop tokens are banned at sampling and stop strings are
not checked.

A failure while handling one request (its sampling row, its logprobs, its stop-string check)
ends that request with an "abort" finish reason (`internal_error`) instead of the step: sampling
that fails for a batch is retried row by row to find the rows at fault, and each request's
bookkeeping in `process` is guarded on its own.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import torch

from sglang.srt.constrained.grammar_backend import allocate_bitmask, allows_other_than
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.sampler import Sampler, SamplerOutput
from sglang.srt.managers.io_struct import ReqOutput
from sglang.srt.managers.schedule_batch import FinishReason, Req, ScheduleBatch, ScheduledReq
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

logger = logging.getLogger(__name__)


def internal_error(exc: BaseException) -> FinishReason:
    """The finish reason of a request that an unexpected exception ended."""
    return FinishReason("abort", message=f"internal error: {type(exc).__name__}: {exc}")


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], vocab_size: int, tknp_rank: int = 0):
        self.tokenizer = tokenizer
        self.tknp_rank = tknp_rank  # stamped on outputs, for per-rank metrics
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_size = vocab_size
        self.sampler = Sampler()

    def sample(self, batch: ScheduleBatch, logits: LogitsProcessorOutput) -> Optional[SamplerOutput]:
        reqs = [it.req for it in batch.items if it.samples]
        if not reqs:
            return None
        token_bitmask = self._token_bitmask(reqs)
        info = SamplingBatchInfo.build(
            params=[r.sampling_params for r in reqs],
            seeds=[r.seed for r in reqs],
            steps=[len(r.output_ids) for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            input_ids=[r.origin_input_ids for r in reqs],
            banned_token_ids=self._banned_rows(reqs, token_bitmask),
            vocab_size=self.vocab_size,
            device=logits.next_token_logits.device,  # every table beside the logits it works on
            token_bitmask=token_bitmask,
        )
        return_logprob = any(r.return_logprob for r in reqs)
        top_nums = [r.top_logprobs_num if r.return_logprob else 0 for r in reqs] if return_logprob else None
        return self.sampler(logits.next_token_logits, info, return_logprob, top_nums)

    def sample_or_isolate(
        self, batch: ScheduleBatch, logits: LogitsProcessorOutput
    ) -> tuple[Optional[SamplerOutput], dict[str, FinishReason]]:
        """`sample`, and the requests (by rid) it failed for, with their abort reasons.

        A row's draw depends on its own logits and parameters only, so when the batch fails
        each sampling request is sampled alone: the ones that still fail are returned (their
        row in the output is a placeholder), the others get the token the batch would have
        given them.
        """
        try:
            return self.sample(batch, logits), {}
        except Exception as exc:
            items = [it for it in batch.items if it.samples]
            if len(items) == 1:
                logger.exception("sampling failed for request %s", items[0].req.rid)
                return None, {items[0].req.rid: internal_error(exc)}
            logger.warning("sampling a batch of %d failed (%r); sampling its requests one by one", len(items), exc)
        return_logprob = any(it.req.return_logprob for it in items)
        rows: list[Optional[SamplerOutput]] = []
        failed: dict[str, FinishReason] = {}
        for row, item in enumerate(items):
            alone = LogitsProcessorOutput(next_token_logits=logits.next_token_logits[row : row + 1])
            try:
                rows.append(self.sample(ScheduleBatch([ScheduledReq(item.req, item.extend_len, True)]), alone))
            except Exception as exc:
                logger.exception("sampling failed for request %s", item.req.rid)
                rows.append(None)
                failed[item.req.rid] = internal_error(exc)
        return _merge_rows(rows, return_logprob, logits.next_token_logits.device), failed

    def _token_bitmask(self, reqs: list[Req]) -> Optional[tuple[list[int], torch.Tensor]]:
        """(rows, CPU bitmask) of the allowed next tokens of the requests with a grammar."""
        rows = [row for row, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None
        bitmask = allocate_bitmask(len(rows), self.vocab_size)
        for i, row in enumerate(rows):
            reqs[row].grammar.fill_next_token_bitmask(bitmask, i)
        return rows, bitmask

    def _banned_rows(
        self, reqs: list[Req], token_bitmask: Optional[tuple[list[int], torch.Tensor]]
    ) -> list[Optional[list[int]]]:
        """Each row's banned stop tokens (before min_new_tokens). A grammar that allows nothing
        but a banned token has ended: its end wins over min_new_tokens, as over ignore_eos."""
        banned = [self._banned(r) for r in reqs]
        for i, row in enumerate(token_bitmask[0] if token_bitmask is not None else ()):
            if banned[row] and not allows_other_than(token_bitmask[1][i], banned[row]):
                banned[row] = None
        return banned

    def _banned(self, req: Req) -> Optional[list[int]]:
        params = req.sampling_params
        if len(req.output_ids) >= params.min_new_tokens:
            return None
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops |= self.eos_token_ids
        return sorted(stops)

    def process(
        self,
        batch: ScheduleBatch,
        logits: LogitsProcessorOutput,
        sampled: Optional[SamplerOutput],
        failed: Optional[dict[str, FinishReason]] = None,
    ) -> Iterator[tuple[Req, Optional[FinishReason]]]:
        """Appends sampled tokens and logprobs; yields each request that progressed, with its
        finish reason (None while it goes on). Requests mid-prefill are not yielded, unless
        they failed: those in `failed` (rid -> reason: sampling failed for them) and those
        whose bookkeeping raises here are yielded with their abort reason."""
        failed = failed or {}
        next_ids = sampled.next_token_ids.tolist() if sampled is not None else []
        logprob_row = 0
        sample_row = 0
        for item in batch.items:
            req = item.req
            # rows are counted before anything can fail, so a failure never shifts the next request's
            num_input_rows = self._num_input_logprob_rows(req, item.extend_len)
            reason = failed.get(req.rid)
            if reason is None:
                try:
                    self._take_input_logprobs(req, item.extend_len, logits, logprob_row, num_input_rows)
                    if item.samples:
                        self._append_sampled(req, next_ids[sample_row], sampled, sample_row)
                        reason = self._check_finished(req)
                    elif req.kv_len == req.fill_len:
                        # prefill-only request (max_new_tokens == 0) whose prompt is now cached
                        reason = FinishReason("length", length=0)
                except Exception as exc:
                    logger.exception("handling the step's output failed for request %s", req.rid)
                    reason = internal_error(exc)
            logprob_row += num_input_rows
            if item.samples:
                sample_row += 1
            if item.samples or reason is not None:
                yield req, reason

    def _append_sampled(self, req: Req, token: int, sampled: SamplerOutput, row: int) -> None:
        req.output_ids.append(token)
        if req.return_logprob:
            req.output_token_logprobs.append(float(sampled.next_token_logprobs[row]))
            tops = sampled.top_logprobs[row] if sampled.top_logprobs else None
            req.output_top_logprobs.append(tops)

    @staticmethod
    def _num_input_logprob_rows(req: Req, extend_len: int) -> int:
        """Rows of the step's input logprobs that belong to `req` (kv_len is already advanced)."""
        if not req.wants_input_logprobs:
            return 0
        start = req.kv_len - extend_len
        first, last = max(req.first_scoring_position, start), min(start + extend_len, len(req.origin_input_ids) - 1)
        return max(last - first, 0)

    def _take_input_logprobs(self, req: Req, extend_len: int, logits: LogitsProcessorOutput, row: int, n: int) -> None:
        if not req.wants_input_logprobs:
            return
        start = req.kv_len - extend_len  # kv_len was already advanced past this step
        if req.logprob_start_len == 0 and start == 0:
            req.input_token_logprobs.append(None)  # token 0 has no context, so no score
            req.input_top_logprobs.append(None)
        if n:
            req.input_token_logprobs += logits.input_token_logprobs[row : row + n].tolist()
            if req.top_logprobs_num > 0:
                vals, ids = logits.input_top_logprobs
                k = req.top_logprobs_num
                for v, i in zip(vals[row : row + n, :k].tolist(), ids[row : row + n, :k].tolist()):
                    req.input_top_logprobs.append((v, i))
            else:
                req.input_top_logprobs += [None] * n

    def _check_finished(self, req: Req) -> Optional[FinishReason]:
        params = req.sampling_params
        token = req.output_ids[-1]
        grammar_ended = False
        if req.grammar is not None:
            if not req.grammar.accept_token(token):
                # a safety net: the mask leaves every row a token it allows (see _banned_rows)
                return FinishReason("abort", message=f"the sampled token {token} does not match the request's grammar")
            grammar_ended = req.grammar.is_terminated()
        if len(req.output_ids) >= params.max_new_tokens:
            return FinishReason("length", length=params.max_new_tokens)
        if grammar_ended:
            return FinishReason("stop", matched=token)
        if token in (params.stop_token_ids or ()):
            return FinishReason("stop", matched=token)
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason("stop", matched=token)
        if params.stop and len(req.output_ids) >= params.min_new_tokens:
            # Only the tail can contain a stop string that was not there one token ago.
            tail_ids = req.output_ids[-(params.stop_str_max_len + 2) :]
            tail = self.tokenizer.decode(tail_ids, skip_special_tokens=params.skip_special_tokens)
            # the stop string that starts first is the one the output ends at
            found = [(tail.find(stop), i) for i, stop in enumerate(params.stop) if stop in tail]
            if found:
                return FinishReason("stop", matched=params.stop[min(found)[1]])
        return None

    def make_output(self, req: Req) -> ReqOutput:
        """Everything new since the last output of this request."""
        params = req.sampling_params
        new_ids = req.output_ids[req.num_sent_tokens :]
        out = ReqOutput(
            rid=req.rid,
            new_token_ids=new_ids,
            finished_reason=req.finished_reason.to_json() if req.finished_reason else None,
            prompt_tokens=len(req.origin_input_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            no_stop_trim=params.no_stop_trim,
            stop_strings=list(params.stop or ()),
            queue_seconds=req.queue_seconds,
            first_token_seconds=req.first_token_seconds,
            tknp_rank=self.tknp_rank,
        )
        if req.return_logprob:
            sent_in = req.num_sent_input_logprobs
            window = req.origin_input_ids[max(req.logprob_start_len, 0) :]
            out.input_token_logprobs = list(zip(req.input_token_logprobs[sent_in:], window[sent_in:]))
            out.input_top_logprobs = req.input_top_logprobs[sent_in:]
            req.num_sent_input_logprobs = len(req.input_token_logprobs)
            sent = req.num_sent_tokens
            out.output_token_logprobs = list(zip(req.output_token_logprobs[sent:], new_ids))
            out.output_top_logprobs = req.output_top_logprobs[sent:]
        req.num_sent_tokens = len(req.output_ids)
        return out


def _merge_rows(rows: list[Optional[SamplerOutput]], return_logprob: bool, device: torch.device) -> SamplerOutput:
    """One SamplerOutput from one per sampling row (None: a failed row, given placeholders)."""
    token_ids = [int(r.next_token_ids[0]) if r is not None else 0 for r in rows]
    if not return_logprob:
        return SamplerOutput(torch.tensor(token_ids, dtype=torch.int64, device=device), None, None)
    logprobs = [
        float(r.next_token_logprobs[0]) if r is not None and r.next_token_logprobs is not None else 0.0 for r in rows
    ]
    tops = [r.top_logprobs[0] if r is not None and r.top_logprobs else None for r in rows]
    return SamplerOutput(
        torch.tensor(token_ids, dtype=torch.int64, device=device),
        torch.tensor(logprobs, dtype=torch.float32, device=device),
        tops,
    )
