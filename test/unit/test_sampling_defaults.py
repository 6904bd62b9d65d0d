"""The model's recommended sampling parameters fill what a request omits; the request wins."""

from __future__ import annotations

import pytest
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.server_args import ServerArgs, sampling_defaults


class ByteTokenizer:
    def encode(self, text: str, **_) -> list[int]:
        return list(text.encode())


def tokenized_params(tm: TokenizerManager, sampling_params):
    [req] = tm.tokenize(GenerateReqInput(text="hi", sampling_params=sampling_params))
    return req.sampling_params


@pytest.fixture
def tm() -> TokenizerManager:
    return TokenizerManager(
        ByteTokenizer(),
        vocab_size=256,
        context_len=1024,
        random_seed=0,
        sampling_defaults={"temperature": 0.2, "top_p": 0.9},
    )


def test_omitted_or_null_parameters_take_the_model_defaults(tm: TokenizerManager):
    for given in (None, {}, {"max_new_tokens": 4}, {"temperature": None, "top_p": None}):
        params = tokenized_params(tm, given)
        assert (params.temperature, params.top_p) == (0.2, 0.9), given


def test_request_values_win(tm: TokenizerManager):
    params = tokenized_params(tm, {"temperature": 1.0, "top_p": 1.0})
    assert (params.temperature, params.top_p) == (1.0, 1.0)
    assert tokenized_params(tm, {"temperature": 0}).is_greedy
    with pytest.raises(ValueError, match="sampling_params must be"):
        tokenized_params(tm, "hot")  # a bad value still gets the parser's own error


def test_batch_entries_each_take_the_defaults(tm: TokenizerManager):
    reqs = tm.tokenize(GenerateReqInput(text=["a", "b"], sampling_params=[{"temperature": 0.7}, {}]))
    assert [(r.sampling_params.temperature, r.sampling_params.top_p) for r in reqs] == [(0.7, 0.9), (0.2, 0.9)]


def test_sampling_defaults_flag_chooses_model_or_neutral():
    class Config:
        default_sampling_params = {"temperature": 0.2}

    assert sampling_defaults(ServerArgs(), Config()) == {"temperature": 0.2}
    assert sampling_defaults(ServerArgs(sampling_defaults="openai"), Config()) == {}
