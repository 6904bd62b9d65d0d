"""Scheduling decisions in milliseconds: a Scheduler over real KV pools (ReqToTokenPool,
TokenToKVPoolAllocator, MHATokenToKVPool, radix cache) and a fake forward whose logits make
greedy sampling pick a scripted token. No model, no processes.

Each step records the batch `_schedule` built as (rid, extend_len, samples) per request, in
batch order, and checks the pools' integrity (free + owned + cached == total).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.managers import scheduler as scheduler_module
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.managers.output_processor import OutputProcessor
from sglang.srt.managers.schedule_policy import PrefillBudget
from sglang.srt.managers.scheduler import Scheduler, SchedulerInvariantError
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 64
EOS = 2
FILLER = 5  # what the fake model generates unless its script says otherwise
TO_EOS = 7  # a request whose last token is this one generates EOS next

INIT_RATIO = scheduler_module._INIT_NEW_TOKEN_RATIO
MIN_RATIO = scheduler_module._MIN_NEW_TOKEN_RATIO
RATIO_DECAY = scheduler_module._NEW_TOKEN_RATIO_DECAY


class FakeForward:
    """A Forward whose logits put all mass on `script.get(last input token, FILLER)`."""

    comm_seconds = wait_seconds = 0.0
    overlapped_steps = 0

    def __init__(self, script: Optional[dict[int, int]] = None):
        self.script = {TO_EOS: EOS, **(script or {})}
        self.batches: list[Optional[ForwardBatch]] = []

    def __call__(self, batch: Optional[ForwardBatch]) -> Optional[LogitsProcessorOutput]:
        self.batches.append(batch)
        if batch is None:
            return None
        rows = batch.input_ids[batch.sample_indices].tolist()
        logits = torch.zeros(len(rows), VOCAB)  # [S, V]
        for i, token in enumerate(rows):
            logits[i, self.script.get(token, FILLER)] = 10.0
        return LogitsProcessorOutput(next_token_logits=logits)


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i): all OutputProcessor needs for stop strings."""

    def decode(self, ids: list[int], **_) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class Harness:
    """A Scheduler on real pools of `total_tokens` slots and the fake forward; `step` returns
    the step's batch as (rid, extend_len, samples) per request."""

    def __init__(
        self,
        total_tokens: int = 64,
        page_size: int = 1,
        max_running: int = 8,
        chunked_prefill_size: Optional[int] = None,
        disable_radix_cache: bool = False,
        script: Optional[dict[int, int]] = None,
    ):
        runner = SimpleNamespace(
            req_to_token_pool=ReqToTokenPool(max_running, max_context_len=256),
            allocator=TokenToKVPoolAllocator(total_tokens, page_size),
            kv_pool=MHATokenToKVPool(
                total_tokens, torch.float32, num_kv_heads=1, head_dim=2, layer_num=1, page_size=page_size
            ),
            plan=SimpleNamespace(max_running_requests=max_running, weight_bytes=0),
            model_config=SimpleNamespace(eos_token_ids={EOS}, vocab_size=VOCAB),
        )
        self.forward = FakeForward(script)
        self.sched = Scheduler(
            runner,
            CharTokenizer(),
            chunked_prefill_size=chunked_prefill_size,
            disable_radix_cache=disable_radix_cache,
            forward=self.forward,
        )
        self.total_tokens = total_tokens
        self.steps: list[list[tuple[str, int, bool]]] = []
        self.prefill_tokens: list[int] = []  # per step, decodes not counted
        self.finished: dict[str, dict] = {}
        self.outputs: dict[str, list[int]] = {}
        schedule = self.sched._schedule

        def recording_schedule():
            batch = schedule()
            self.steps.append([(it.req.rid, it.extend_len, it.samples) for it in batch.items])
            decodes = sum(1 for it in batch.items if self.sched._is_decoding(it.req))
            self.prefill_tokens.append(batch.num_tokens() - decodes)
            return batch

        self.sched._schedule = recording_schedule

    def add(self, rid: str, prompt_len: int, max_new_tokens: int = 4, first: Optional[int] = None, **params) -> None:
        """A request whose prompt shares no prefix with the others' unless `first` says so."""
        if first is None:
            first = 10 + self.sched.num_received_reqs % 40
        self.add_ids(rid, [first] + [50 + i % 10 for i in range(prompt_len - 1)], max_new_tokens, **params)

    def add_ids(self, rid: str, ids: list[int], max_new_tokens: int = 4, **params) -> None:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **params)
        sampling.normalize()
        self.sched.handle(TokenizedGenerateReqInput(rid=rid, input_ids=ids, sampling_params=sampling, seed=0))

    def step(self) -> list[tuple[str, int, bool]]:
        for out in self.sched.step():
            self.outputs.setdefault(out.rid, []).extend(out.new_token_ids)
            if out.finished_reason is not None:
                self.finished[out.rid] = out.finished_reason
        self.sched.check_integrity()
        return self.steps[-1]

    def run(self, max_steps: int = 200) -> list[list[tuple[str, int, bool]]]:
        """Steps until no work is left; returns the batches of the steps it took."""
        start = len(self.steps)
        for _ in range(max_steps):
            if not self.sched.has_work():
                return self.steps[start:]
            self.step()
        raise AssertionError(f"still working after {max_steps} steps")

    @property
    def running(self) -> list[str]:
        return [r.rid for r in self.sched.running]

    @property
    def waiting(self) -> list[str]:
        return [r.rid for r in self.sched.waiting]

    def assert_pool_back(self) -> None:
        """Every request finished; all KV is free or evictable, and free after a flush."""
        kv = self.sched.kv
        assert not self.sched.has_work()
        assert kv.available_size() == self.total_tokens
        assert kv.req_to_token_pool.available_size() == kv.req_to_token_pool.size
        assert self.sched.flush_cache()
        assert kv.allocator.available_size() == self.total_tokens


# ---- batch composition ------------------------------------------------------------------


def test_prefill_then_one_decode_token_per_step():
    h = Harness()
    h.add("a", 5, max_new_tokens=3)
    assert h.run() == [[("a", 5, True)], [("a", 1, True)], [("a", 1, True)]]
    assert h.outputs["a"] == [FILLER] * 3
    assert h.finished["a"] == {"type": "length", "length": 3}
    decode = h.forward.batches[1]  # feeds the first generated token back at position 5
    assert decode.input_ids.tolist() == [FILLER] and decode.positions.tolist() == [5]
    assert decode.seq_lens_cpu == [6] and decode.kv_lens == [5]
    h.assert_pool_back()


def test_decodes_come_first_then_new_prefills_in_arrival_order():
    h = Harness()
    h.add("a", 6)
    assert h.step() == [("a", 6, True)]
    h.add("b", 3)
    h.add("c", 4)
    assert h.step() == [("a", 1, True), ("b", 3, True), ("c", 4, True)]
    assert h.step() == [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    h.run()
    assert all(h.outputs[r] == [FILLER] * 4 for r in "abc")
    h.assert_pool_back()


def test_eos_finishes_a_request_and_frees_its_slots():
    h = Harness()
    h.add_ids("a", [10, 11, 12, TO_EOS], max_new_tokens=10)
    assert h.run() == [[("a", 4, True)]]
    assert h.outputs["a"] == [EOS] and h.finished["a"] == {"type": "stop", "matched": EOS}
    h.assert_pool_back()


def test_chunked_prefill_continues_before_new_requests():
    h = Harness(chunked_prefill_size=4)
    h.add("a", 10, max_new_tokens=2)
    assert h.step() == [("a", 4, False)]
    h.add("b", 3, max_new_tokens=2)
    # a's next chunk takes the whole budget: b waits although memory is plentiful
    assert h.step() == [("a", 4, False)]
    assert h.waiting == ["b"]
    # a's last 2 tokens leave 2 of the budget: b starts with a chunk of 2
    assert h.step() == [("a", 2, True), ("b", 2, False)]
    # decodes first, then the unfinished chunk
    assert h.step() == [("a", 1, True), ("b", 1, True)]
    assert h.run() == [[("b", 1, True)]]
    assert h.outputs == {"a": [FILLER] * 2, "b": [FILLER] * 2}
    h.assert_pool_back()


def test_a_request_is_admitted_only_when_its_prefill_fits_beside_the_running_ones():
    h = Harness(total_tokens=16)
    h.add("a", 10, max_new_tokens=3)
    h.add("b", 8, max_new_tokens=1)
    # b's 8 slots do not fit beside a's 10 in 16, in this step or while a runs
    assert h.run() == [[("a", 10, True)], [("a", 1, True)], [("a", 1, True)], [("b", 8, True)]]
    h.assert_pool_back()


def test_the_decode_reserve_keeps_a_request_waiting_that_raw_free_slots_would_fit():
    h = Harness(total_tokens=20)
    h.add("a", 10, max_new_tokens=10)
    assert h.step() == [("a", 10, True)]
    h.add("b", 6, max_new_tokens=1)
    # 10 slots are free, enough for b's 6 and a's next token, but a may still generate 9 more
    # tokens and the reserve (new_token_ratio of those) keeps b out until a finishes
    steps = h.run()
    assert steps[:9] == [[("a", 1, True)]] * 9
    assert steps[9:] == [[("b", 6, True)]]
    assert h.sched.num_retractions == 0
    h.assert_pool_back()


def test_max_running_requests_caps_admission():
    h = Harness(max_running=2)
    h.add("a", 3, max_new_tokens=3)
    assert h.step() == [("a", 3, True)]
    h.add("b", 3, max_new_tokens=3)
    assert h.step() == [("a", 1, True), ("b", 3, True)]
    h.add("c", 3, max_new_tokens=3)
    # two are running: c waits, with memory to spare
    assert h.step() == [("a", 1, True), ("b", 1, True)]
    assert h.sched.get_load().num_waiting_reqs == 1
    # a finished in that step: c takes its place
    assert h.step() == [("b", 1, True), ("c", 3, True)]
    h.run()
    h.assert_pool_back()


def test_a_cached_prefix_is_not_recomputed():
    h = Harness()
    h.add("a", 12, max_new_tokens=1, first=10)
    h.run()
    h.add("b", 12, max_new_tokens=1, first=10)  # the same prompt: all but its last token comes from the cache
    assert h.run() == [[("b", 1, True)]]
    assert h.sched.num_cache_hit_tokens == 11
    h.assert_pool_back()


def test_a_request_sharing_a_running_prompt_needs_only_its_own_slots():
    h = Harness(total_tokens=20)
    h.add("a", 10, max_new_tokens=6, first=10)
    assert h.step() == [("a", 10, True)]
    h.add("b", 10, max_new_tokens=1, first=10)  # the same prompt: 9 tokens locked by a, 1 to compute
    # 10 slots are free: a's next token and reserve (1 + int(0.699 * 5) = 4) leave 6 for b's 1
    assert h.step() == [("a", 1, True), ("b", 1, True)]


def test_a_prompt_larger_than_the_pool_is_aborted_on_arrival():
    h = Harness(total_tokens=16)
    h.add("big", 16)  # 16 prompt slots + 1 for the first generated token
    h.add("small", 4, max_new_tokens=1)
    assert h.step() == [("small", 4, True)]
    assert h.finished["big"]["type"] == "abort"
    assert "needs 17 KV slots" in h.finished["big"]["message"]
    h.assert_pool_back()


def test_abort_of_a_running_request_frees_its_slots():
    h = Harness()
    h.add("a", 5, max_new_tokens=50)
    h.step()
    h.add("b", 5, max_new_tokens=3)
    h.step()
    h.sched.handle(AbortReq("a", "stop it"))
    assert h.running == ["b"]
    h.run()
    assert h.finished["a"] == {"type": "abort", "message": "stop it"}
    assert h.outputs["b"] == [FILLER] * 3
    h.assert_pool_back()


def test_lockstep_forwards_an_empty_batch():
    h = Harness()
    assert h.sched.step(lockstep=True) == []
    assert h.forward.batches == [None]
    h.sched.step()
    assert h.forward.batches == [None], "without lockstep an empty step runs no forward"


# ---- retraction and new_token_ratio -------------------------------------------------------


def test_retraction_takes_the_newest_request_back_to_the_front_of_waiting():
    h = Harness(total_tokens=12)
    for rid in "abc":
        h.add(rid, 4, max_new_tokens=3)
    h.add("d", 2, max_new_tokens=3)
    # a, b and c fill all 12 slots; d does not fit
    assert h.step() == [("a", 4, True), ("b", 4, True), ("c", 4, True)]
    assert h.waiting == ["d"]
    # three decodes need 3 slots and none is free: the newest (c) is retracted, its KV goes to
    # the prefix cache (4 evictable slots), which is enough for a's and b's decodes
    assert h.step() == [("a", 1, True), ("b", 1, True)]
    assert h.sched.num_retractions == 1
    assert h.running == ["a", "b"] and h.waiting == ["c", "d"]
    retracted = h.sched.waiting[0]
    assert retracted.num_retractions == 1 and retracted.output_ids == [FILLER]
    assert retracted.req_pool_idx is None and retracted.kv_len == 0
    h.run()
    # c resumes from its prompt and first token: the same outputs as without retraction
    assert all(h.outputs[r] == [FILLER] * 3 for r in "abcd")
    assert all(h.finished[r] == {"type": "length", "length": 3} for r in "abcd")
    assert h.sched.get_load().num_retractions == 1
    h.assert_pool_back()


def test_new_token_ratio_decays_per_step_to_its_floor_and_resets_on_retraction():
    h = Harness(total_tokens=12)
    assert h.sched.new_token_ratio == INIT_RATIO
    for k in range(1, 4):  # idle steps decay it too
        h.step()
        assert h.sched.new_token_ratio == pytest.approx(INIT_RATIO - k * RATIO_DECAY)
    for _ in range(int((INIT_RATIO - MIN_RATIO) / RATIO_DECAY) + 10):
        h.step()
    assert h.sched.new_token_ratio == MIN_RATIO
    h.add("a", 6, max_new_tokens=4)
    assert h.step() == [("a", 6, True)]
    # at the floor the reserve for a's 3 remaining tokens is int(0.1 * 3) = 0 slots: b's 5 fit
    # beside a's next token
    h.add("b", 5, max_new_tokens=4)
    assert h.step() == [("a", 1, True), ("b", 5, True)]
    assert h.sched.new_token_ratio == MIN_RATIO
    # a holds 7 slots and b 5, the whole pool, and both decode: the newer, b, goes back to waiting
    assert h.step() == [("a", 1, True)]
    assert h.sched.num_retractions == 1 and h.running == ["a"] and h.waiting == ["b"]
    # the retraction set the ratio back to its initial value, then this step decayed it once
    assert h.sched.new_token_ratio == pytest.approx(INIT_RATIO - RATIO_DECAY)
    h.run()
    assert h.outputs == {"a": [FILLER] * 4, "b": [FILLER] * 4}
    h.assert_pool_back()


def test_paged_decode_takes_a_new_page_only_when_its_last_is_full():
    h = Harness(total_tokens=32, page_size=16)
    h.sched.new_token_ratio = MIN_RATIO  # a decode reserve of 0 slots lets b start beside a
    h.add("a", 15, max_new_tokens=4)
    assert h.step() == [("a", 15, True)]  # one page of 16 slots
    h.add("b", 15, max_new_tokens=3)
    # a's token 15 goes into the free slot of its page: b gets the other page
    assert h.step() == [("a", 1, True), ("b", 15, True)]
    assert h.sched.num_retractions == 0
    # a's token 16 needs a new page and none is free (b's token 15 would fit in b's page): the
    # newer, b, is retracted; 15 tokens are not a whole page for the cache, so its page is
    # freed, and a takes it
    assert h.step() == [("a", 1, True)]
    assert h.sched.num_retractions == 1 and h.waiting == ["b"]
    assert h.sched.kv.tree.total_size() == 0 and h.sched.kv.allocator.available_size() == 0
    h.run()
    assert h.outputs == {"a": [FILLER] * 4, "b": [FILLER] * 3}
    h.assert_pool_back()


def test_a_request_started_with_part_of_its_prompt_gets_the_rest_next_step():
    h = Harness(total_tokens=32, chunked_prefill_size=4)
    h.add("a", 4, max_new_tokens=16)
    assert h.step() == [("a", 4, True)]
    h.add("b", 8, max_new_tokens=24)
    # admission found room for all of b's prompt beside a's reserve; the budget cuts it at 4
    assert h.step() == [("a", 1, True), ("b", 4, False)]
    # 23 slots are free for b's last 4 prompt tokens (today b gets none until a finishes)
    assert h.step() == [("a", 1, True), ("b", 4, True)]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_a_mixed_workload_on_a_small_pool_finishes_and_returns_every_slot(page_size, disable_radix_cache):
    h = Harness(total_tokens=64, page_size=page_size, chunked_prefill_size=24, disable_radix_cache=disable_radix_cache)
    lengths = [5, 40, 17, 3, 33, 8, 21, 12]
    new_tokens = [10 + 7 * (i % 4) for i in range(len(lengths))]
    for i, (n, m) in enumerate(zip(lengths, new_tokens)):
        h.add(f"r{i}", n, max_new_tokens=m, first=10 + (i % 2))  # two families of shared prefixes
    h.run(max_steps=500)
    assert h.sched.num_retractions > 0, "the pool was meant to force retraction"
    assert max(h.prefill_tokens) <= 24, "a step went over the prefill budget"
    for i, m in enumerate(new_tokens):
        assert h.outputs[f"r{i}"] == [FILLER] * m and h.finished[f"r{i}"]["type"] == "length"
    h.assert_pool_back()


# ---- PrefillBudget.take --------------------------------------------------------------------


def test_budget_take_is_limited_by_tokens_then_by_memory():
    budget = PrefillBudget(tokens=8, reserved=0)
    assert budget.take(kv_len=0, wanted=10, available=100) == 8
    assert (budget.tokens, budget.reserved) == (0, 8)
    assert budget.take(kv_len=0, wanted=3, available=100) == 0, "no token budget left"

    budget = PrefillBudget(tokens=100, reserved=5)
    assert budget.take(kv_len=0, wanted=10, available=12) == 7
    assert (budget.tokens, budget.reserved) == (93, 12)
    assert budget.take(kv_len=0, wanted=10, available=12) == 0, "memory is all promised"
    assert (budget.tokens, budget.reserved) == (93, 12)

    budget = PrefillBudget(tokens=100, reserved=20)
    assert budget.take(kv_len=3, wanted=4, available=10) == 0, "reserved beyond what is available"
    assert (budget.tokens, budget.reserved) == (100, 20)


def test_budget_take_counts_whole_pages_and_the_free_rest_of_the_last_one():
    # 6 slots are free in the last page of a request at kv_len 10: they cost nothing
    budget = PrefillBudget(tokens=100, reserved=0, page_size=16)
    assert budget.take(kv_len=10, wanted=30, available=0) == 6
    assert budget.reserved == 0
    # plus one whole new page of 16 (31 available slots are one page, not 31 tokens)
    budget = PrefillBudget(tokens=100, reserved=0, page_size=16)
    assert budget.take(kv_len=10, wanted=30, available=31) == 22
    assert (budget.tokens, budget.reserved) == (78, 16)
    # a fresh request needs a page for its first token
    budget = PrefillBudget(tokens=100, reserved=0, page_size=16)
    assert budget.take(kv_len=0, wanted=5, available=15) == 0
    assert budget.take(kv_len=0, wanted=5, available=16) == 5
    assert budget.reserved == 16, "5 tokens take a whole page"
    # a token budget that ends mid-page still reserves the page
    budget = PrefillBudget(tokens=20, reserved=0, page_size=16)
    assert budget.take(kv_len=0, wanted=40, available=64) == 20
    assert (budget.tokens, budget.reserved) == (0, 32)


# ---- failures inside one request's handling -------------------------------------------------


def _is_internal_error(reason: dict, text: str) -> bool:
    return reason["type"] == "abort" and "internal error" in reason["message"] and text in reason["message"]


def test_a_sampling_failure_aborts_only_its_request_and_the_server_keeps_serving(monkeypatch):
    h = Harness()
    original = OutputProcessor.sample

    def sample(self, batch, logits):
        if any(it.req.rid == "bad" for it in batch.items if it.samples):
            raise IndexError("index 49152 is out of bounds")
        return original(self, batch, logits)

    monkeypatch.setattr(OutputProcessor, "sample", sample)
    h.add("a", 5, max_new_tokens=3)
    h.add("bad", 4, max_new_tokens=3)
    h.add("c", 6, max_new_tokens=3)
    h.sched.waiting[-1].stream = True
    assert h.step() == [("a", 5, True), ("bad", 4, True), ("c", 6, True)]
    assert _is_internal_error(h.finished["bad"], "IndexError: index 49152 is out of bounds")
    assert h.running == ["a", "c"]  # the others of the batch sampled alone, with their own tokens
    h.run()
    assert h.outputs == {"a": [FILLER] * 3, "bad": [], "c": [FILLER] * 3}
    h.add("later", 3, max_new_tokens=2)
    h.run()
    assert h.outputs["later"] == [FILLER] * 2 and h.finished["later"]["type"] == "length"
    h.assert_pool_back()


def test_a_failure_nobody_isolated_aborts_the_batch_and_frees_its_slots(monkeypatch):
    h = Harness(chunked_prefill_size=8)
    h.add("a", 5, max_new_tokens=3)
    h.add("b", 12, max_new_tokens=3)  # mid-prefill in the failing step: it fails too
    monkeypatch.setattr(OutputProcessor, "process", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    assert h.step() == [("a", 5, True), ("b", 3, False)]
    assert _is_internal_error(h.finished["a"], "RuntimeError: boom")
    assert _is_internal_error(h.finished["b"], "RuntimeError: boom")
    assert not h.sched.running and not h.sched.waiting
    monkeypatch.undo()
    h.add("later", 3, max_new_tokens=2)
    h.run()
    assert h.outputs["later"] == [FILLER] * 2
    h.assert_pool_back()


def test_a_stop_string_check_that_raises_aborts_only_its_request():
    h = Harness()

    def decode(ids, **_):
        if 9 in ids:
            raise ValueError("cannot decode")
        return "".join(chr(ord("a") + i) for i in ids)

    h.sched.output.tokenizer.decode = decode
    h.forward.script[8] = 9  # bad's prompt ends with 8: its first token is 9
    h.add("a", 4, max_new_tokens=3, stop=["zz"])
    h.add_ids("bad", [20, 21, 8], max_new_tokens=3, stop=["zz"])
    h.run()
    assert _is_internal_error(h.finished["bad"], "ValueError: cannot decode")
    assert h.outputs["a"] == [FILLER] * 3 and h.finished["a"]["type"] == "length"
    h.assert_pool_back()


def test_an_output_that_cannot_be_built_aborts_its_request(monkeypatch):
    h = Harness()
    original = OutputProcessor.make_output

    def make_output(self, req):
        if req.rid == "bad":
            raise KeyError("logprobs")
        return original(self, req)

    monkeypatch.setattr(OutputProcessor, "make_output", make_output)
    h.add("bad", 4, max_new_tokens=3)
    h.add("a", 5, max_new_tokens=3)
    for req in h.sched.waiting:
        req.stream = True
    h.run()
    assert _is_internal_error(h.finished["bad"], "KeyError")
    assert h.outputs["a"] == [FILLER] * 3
    h.assert_pool_back()


def test_a_request_the_scheduler_cannot_admit_is_answered_not_fatal():
    h = Harness()
    params = SamplingParams(max_new_tokens=2)
    h.sched.handle(TokenizedGenerateReqInput(rid="empty", input_ids=[], sampling_params=params, seed=0))
    h.add("a", 3, max_new_tokens=2)
    h.run()
    assert _is_internal_error(h.finished["empty"], "AssertionError")
    assert h.outputs["a"] == [FILLER] * 2
    h.assert_pool_back()


def test_kv_allocation_failure_is_a_scheduler_bug_and_still_raises(monkeypatch):
    h = Harness()
    h.add("a", 3)
    monkeypatch.setattr(h.sched.kv, "alloc_extend", lambda *_: None)
    with pytest.raises(SchedulerInvariantError, match="scheduler bug"):
        h.step()


def test_prompt_top_logprobs_are_clamped_to_the_vocabulary():
    h = Harness()
    params = SamplingParams(max_new_tokens=1)
    msg = TokenizedGenerateReqInput(
        rid="a", input_ids=[1, 2, 3], sampling_params=params, seed=0, return_logprob=True, top_logprobs_num=100000
    )
    h.sched.handle(msg)
    assert h.sched.waiting[0].top_logprobs_num == VOCAB

    processor = LogitsProcessor(VOCAB)
    batch = SimpleNamespace(
        sample_indices=torch.tensor([2]),
        return_all_logits=False,
        logprob_indices=torch.tensor([0, 1]),
        logprob_target_ids=torch.tensor([2, 3]),
        input_top_logprobs_num=100000,
    )
    out = processor(torch.randn(3, 4), torch.randn(VOCAB, 4), batch)
    values, ids = out.input_top_logprobs
    assert values.shape == ids.shape == (2, VOCAB)
