"""Admission in the TokenizerManager: --max-queued-requests counts requests in flight beyond the
backend's running capacity; a closed (shutting down) manager refuses everything."""

import pytest
from sglang.srt.managers.tokenizer_manager import Overloaded, ReqState, TokenizerManager


def _manager(in_flight: int, max_running: int, max_queued) -> TokenizerManager:
    tm = TokenizerManager(tokenizer=None, vocab_size=10, context_len=100, random_seed=0)
    tm.max_running_requests, tm.max_queued_requests = max_running, max_queued
    tm.rid_to_state = {f"r{i}": ReqState(f"r{i}") for i in range(in_flight)}
    return tm


def test_requests_beyond_running_plus_queued_are_refused():
    _manager(in_flight=2, max_running=2, max_queued=1)._admit(1)  # one waits: allowed
    with pytest.raises(Overloaded, match="overloaded") as info:
        _manager(in_flight=3, max_running=2, max_queued=1)._admit(1)
    assert info.value.retry_after >= 1
    with pytest.raises(Overloaded):  # a batch counts every request it expands to
        _manager(in_flight=0, max_running=2, max_queued=1)._admit(4)


def test_no_limit_by_default_and_closed_refuses_all():
    tm = _manager(in_flight=1000, max_running=1, max_queued=None)
    tm._admit(1)
    tm.close("the server is shutting down")
    with pytest.raises(Overloaded, match="shutting down"):
        tm._admit(1)
