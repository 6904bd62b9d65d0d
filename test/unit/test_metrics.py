"""/metrics rendering: SGLang's names, one series per TKNP rank, and latency histograms fed by the
TokenizerManager's bookkeeping of a request's outputs."""

from prometheus_client.parser import text_string_to_metric_families
from sglang.srt.entrypoints.metrics import ServerMetrics
from sglang.srt.managers.io_struct import GetLoadReqOutput, ReqOutput, ReqStrOutput
from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager


def _load(rank: int = 0, **kw) -> GetLoadReqOutput:
    values = dict(
        num_running_reqs=2,
        num_waiting_reqs=1,
        max_total_num_tokens=100,
        kv_tokens_free=60,
        kv_tokens_cached=10,
        kv_tokens_used=40,
        kv_tokens_pending=0,
        num_received_reqs=3,
        max_running_requests=8,
        num_retractions=0,
        cache_hit_tokens=5,
        prompt_tokens=20,
        generation_tokens=7,
        tknp_rank=rank,
    )
    return GetLoadReqOutput(**{**values, **kw})


def _samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _out(new: list[int], total: int, finished: bool = False, **kw) -> ReqStrOutput:
    reason = {"type": "length", "length": total} if finished else None
    return ReqStrOutput(ReqOutput("r", new, reason, 3, total, 0, **kw), "x")


def test_scheduler_state_is_one_series_per_tknp_rank():
    metrics = ServerMetrics("m")
    load = _load(ranks=[_load(0), _load(1, num_running_reqs=5)], placements=[4, 6])
    got = _samples(metrics.render(load).decode())
    assert got[("sglang:num_running_reqs", (("model_name", "m"), ("tknp_rank", "1")))] == 5
    assert got[("sglang:token_usage", (("model_name", "m"), ("tknp_rank", "0")))] == 0.4
    assert got[("sglang:cache_hit_rate", (("model_name", "m"), ("tknp_rank", "0")))] == 0.25
    assert got[("sglang:prompt_tokens_total", (("model_name", "m"), ("tknp_rank", "0")))] == 20
    assert got[("sglang:tknp_placements_total", (("model_name", "m"), ("tknp_rank", "1")))] == 6


def test_latency_histograms_from_a_streamed_and_a_whole_request():
    metrics = ServerMetrics("m")
    tm = TokenizerManager(tokenizer=None, vocab_size=10, context_len=100, random_seed=0)
    tm.metrics = metrics.requests
    streamed = ReqState("r")
    for i, finished in enumerate([False, False, True]):
        tm.update(streamed, _out([i], i + 1, finished, queue_seconds=0.004, first_token_seconds=0.01))
    whole = ReqState("r")  # not streamed: every token in the final output, timed by the scheduler
    tm.update(whole, _out([1, 2, 3, 4], 4, True, queue_seconds=0.002, first_token_seconds=0.5, tknp_rank=1))
    assert whole.ttft == 0.5
    text = metrics.render(_load()).decode()
    got = _samples(text)
    label = (("model_name", "m"),)
    assert got[("sglang:time_to_first_token_seconds_count", label)] == 2
    assert got[("sglang:inter_token_latency_seconds_count", label)] == 2  # the streamed one's 2 gaps
    assert got[("sglang:e2e_request_latency_seconds_count", label)] == 2
    assert got[("sglang:time_per_output_token_seconds_count", label)] == 2
    rank0, rank1 = label + (("tknp_rank", "0"),), label + (("tknp_rank", "1"),)  # where each waited
    assert got[("sglang:queue_time_seconds_count", rank0)] == got[("sglang:queue_time_seconds_count", rank1)] == 1
    assert abs(got[("sglang:queue_time_seconds_sum", rank0)] - 0.004) < 1e-9
    assert got[("sglang:queue_time_seconds_bucket", (("le", "0.005"), ("model_name", "m"), ("tknp_rank", "1")))] == 1
    assert got[("sglang:time_to_first_token_seconds_bucket", (("le", "+Inf"), ("model_name", "m")))] == 2
    assert "# TYPE sglang:time_to_first_token_seconds histogram" in text


def test_each_app_has_its_own_registry():
    a, b = ServerMetrics("m"), ServerMetrics("m")  # registering the same names twice must not clash
    a.requests.observe_first_token(0.1)
    assert (
        _samples(b.render(_load()).decode())[("sglang:time_to_first_token_seconds_count", (("model_name", "m"),))] == 0
    )
