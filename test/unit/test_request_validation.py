"""What TokenizerManager rejects before a request reaches the scheduler: wrong JSON shapes, text
that is not Unicode, too many top logprobs, a prompt the KV cache cannot hold, and request ids
that clash (a rejected batch registers none of its rids)."""

from __future__ import annotations

import asyncio

import pytest
from sglang.srt.managers.io_struct import MAX_TOP_LOGPROBS_NUM, GenerateReqInput, RequestError, decode
from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager


class ByteTokenizer:
    def encode(self, text: str, **_) -> list[int]:
        return list(text.encode())


class RecordingSocket:
    def __init__(self):
        self.sent = []

    async def send(self, data: bytes) -> None:
        self.sent.append(decode(data))


def _manager(kv_capacity=None, page_size=1) -> TokenizerManager:
    return TokenizerManager(
        ByteTokenizer(), vocab_size=256, context_len=1024, random_seed=0, kv_capacity=kv_capacity, page_size=page_size
    )


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input_ids": 5}, "input_ids"),
        ({"input_ids": {"0": 1}}, "input_ids"),
        ({"input_ids": [[1], 2]}, "input_ids"),
        ({"input_ids": "hello"}, "input_ids"),  # a string is not text here
        ({"input_ids": [1, [2]]}, "input_ids"),
        ({"input_ids": [[1], []]}, "input_ids"),
        ({"text": ["a", "b"], "rid": ["x"]}, "rid"),
        ({"text": "hi", "rid": {"a": 1}}, "rid"),
        ({"text": ["a", "b"], "rid": ["x", 3]}, "rid"),
        ({"text": "hi", "sampling_params": 5}, "sampling_params"),
        ({"text": ["a", "b"], "sampling_params": [{}, 2]}, "sampling_params"),
        ({"text": "\ud800"}, "text"),  # a lone surrogate (JSON "\ud800" through a lenient parser)
        ({"text": "hi", "top_logprobs_num": MAX_TOP_LOGPROBS_NUM + 1}, "top_logprobs_num"),
        ({"text": "hi", "top_logprobs_num": -1}, "top_logprobs_num"),
    ],
)
def test_bad_fields_are_request_errors_naming_the_field(fields, param):
    with pytest.raises(ValueError) as info:
        _manager().tokenize(GenerateReqInput(**fields))
    assert isinstance(info.value, RequestError) and info.value.param == param
    assert param in str(info.value)


def test_top_logprobs_num_up_to_the_cap_is_fine():
    [req] = _manager().tokenize(GenerateReqInput(text="hi", top_logprobs_num=MAX_TOP_LOGPROBS_NUM))
    assert req.top_logprobs_num == MAX_TOP_LOGPROBS_NUM


def test_a_prompt_the_kv_cache_cannot_hold_is_rejected_as_the_scheduler_would():
    # the scheduler reserves prompt + 1 slots on arrival, in whole pages: 15 tokens need 16
    tm = _manager(kv_capacity=16, page_size=4)
    tm.tokenize(GenerateReqInput(input_ids=[1] * 15, sampling_params={"max_new_tokens": 1}))
    with pytest.raises(RequestError, match="needs 20 KV cache slots, more than the 16") as info:
        tm.tokenize(GenerateReqInput(input_ids=[1] * 16, sampling_params={"max_new_tokens": 1}))
    assert info.value.param == "input_ids"
    with pytest.raises(RequestError) as info:
        tm.tokenize(GenerateReqInput(text="x" * 16, sampling_params={"max_new_tokens": 1}))
    assert info.value.param == "text"


def test_clashing_rids_register_nothing_and_the_rid_stays_usable():
    tm = _manager()
    tm._send = RecordingSocket()

    async def first_result(obj):
        stream = tm.generate_request(obj)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    with pytest.raises(RequestError, match="more than once") as info:
        asyncio.run(first_result(GenerateReqInput(text=["a", "b", "c"], rid=["y", "x", "x"])))
    assert info.value.param == "rid"
    assert tm.rid_to_state == {} and tm._send.sent == []

    tm.rid_to_state["busy"] = ReqState("busy")
    with pytest.raises(RequestError, match="already in use"):
        asyncio.run(first_result(GenerateReqInput(text=["a", "b"], rid=["x", "busy"])))
    assert list(tm.rid_to_state) == ["busy"] and tm._send.sent == []
    del tm.rid_to_state["busy"]

    async def reuse():  # the rid is free: the request is sent; closing early aborts it
        stream = tm.generate_request(GenerateReqInput(text="a", rid="x"))
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()

    asyncio.run(reuse())
    assert [type(m).__name__ for m in tm._send.sent] == ["TokenizedGenerateReqInput", "AbortReq"]
    assert tm.rid_to_state == {}
