"""The engine's memory and batching: prefix cache, chunked prefill, retraction, abort, policies."""

import pytest

pytestmark = pytest.mark.slow  # engines on a tiny model

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(make_tiny_model):
    return str(make_tiny_model("llama", seed=1))


def _prompt(tokenizer, n_tokens: int, salt: int = 0) -> list[int]:
    ids = tokenizer.encode(" ".join(f"word{(i * 7 + salt) % 997}" for i in range(n_tokens)))
    return ids[:n_tokens]


def test_shared_prefix_is_cached_and_output_unchanged(engine_factory, model_path):
    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=8192)
    prefix = _prompt(engine.tokenizer, 256)
    a, b = prefix + _prompt(engine.tokenizer, 20, salt=1), prefix + _prompt(engine.tokenizer, 20, salt=2)
    params = {**GREEDY, "max_new_tokens": 12}
    first = engine.generate(input_ids=a, sampling_params=params)
    second = engine.generate(input_ids=b, sampling_params=params)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= 256

    uncached = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=8192, disable_radix_cache=True)
    ref = uncached.generate(input_ids=b, sampling_params=params)
    assert ref["meta_info"]["cached_tokens"] == 0
    assert second["output_ids"] == ref["output_ids"]


def test_chunked_prefill_matches_unchunked(engine_factory, model_path):
    prompts = [_prompt_ids for _prompt_ids in ([3 + i for i in range(300)], [50 + i for i in range(77)])]
    params = {**GREEDY, "max_new_tokens": 10}
    chunked = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096, chunked_prefill_size=64)
    whole = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096, chunked_prefill_size=-1)
    out_chunked = chunked.generate(input_ids=prompts, sampling_params=params)
    out_whole = whole.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in out_chunked] == [o["output_ids"] for o in out_whole]


def test_small_pool_retracts_and_matches_large_pool(engine_factory, model_path):
    prompts = [[10 + 13 * i + j for j in range(24 + 3 * i)] for i in range(10)]
    params = {**GREEDY, "max_new_tokens": 48}
    small = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=256, chunked_prefill_size=64)
    large = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=8192)
    out_small = small.generate(input_ids=prompts, sampling_params=params)
    out_large = large.generate(input_ids=prompts, sampling_params=params)
    assert small.scheduler.num_retractions > 0, "the small pool was meant to force retraction"
    assert [o["output_ids"] for o in out_small] == [o["output_ids"] for o in out_large]
    assert all(o["meta_info"]["completion_tokens"] == 48 for o in out_small)


def test_max_running_requests_bounds_the_batch(engine_factory, model_path):
    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096, max_running_requests=3)
    sched = engine.scheduler
    seen = []
    original_step = sched.step

    def step():
        seen.append(len(sched.running))
        return original_step()

    sched.step = step
    outs = engine.generate(input_ids=[[5 + i, 6, 7] for i in range(8)], sampling_params={**GREEDY, "max_new_tokens": 5})
    assert len(outs) == 8 and max(seen) <= 3


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_schedule_policies_complete_every_request(engine_factory, model_path, policy):
    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096, schedule_policy=policy)
    shared = list(range(100, 164))
    prompts = [shared + [i] for i in range(6)] + [[900 + i, 901] for i in range(3)]
    outs = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 4})
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [4] * 9


def test_abandoned_stream_is_aborted_and_frees_its_slots(engine_factory, model_path):
    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096)
    stream = engine.generate(input_ids=[1, 2, 3, 4], sampling_params={**GREEDY, "max_new_tokens": 50}, stream=True)
    chunks = [next(stream) for _ in range(3)]
    assert chunks[-1]["meta_info"]["finish_reason"] is None
    stream.close()  # the caller walks away: the request must end and give its KV back
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_abort_request_ends_with_abort_reason(engine_factory, model_path):
    from sglang.srt.managers.io_struct import AbortReq

    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096)
    stream = engine.generate(
        input_ids=[1, 2, 3, 4], sampling_params={**GREEDY, "max_new_tokens": 50}, stream=True, rid="victim"
    )
    next(stream)
    engine.scheduler.handle(AbortReq("victim"))
    last = list(stream)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 50


def test_prompt_larger_than_pool_is_aborted_not_hung(engine_factory, model_path):
    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=64)
    out = engine.generate(input_ids=list(range(1, 101)), sampling_params={**GREEDY, "max_new_tokens": 4})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "KV cache" in out["meta_info"]["finish_reason"]["message"]


def test_running_request_shares_its_prompt_with_later_arrivals(engine_factory, model_path):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    engine = engine_factory(model_path=model_path, dtype="float32", max_total_tokens=4096)
    sched = engine.scheduler
    prefix = list(range(10, 310))

    def request(rid, ids, max_new):
        params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
        params.normalize()
        return TokenizedGenerateReqInput(rid=rid, input_ids=ids, sampling_params=params, seed=0)

    sched.handle(request("long", prefix + [1], 40))
    sched.step()  # prefills "long", which then keeps decoding
    sched.handle(request("late", prefix + [2], 3))
    outputs = []
    while sched.has_work():
        outputs += sched.step()
        sched.check_integrity()
    late = next(o for o in outputs if o.rid == "late")
    assert late.cached_tokens >= 300, "the running request's prompt was shared through the cache"
    assert next(o for o in outputs if o.rid == "long").completion_tokens == 40
