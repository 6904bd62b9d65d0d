"""Sampling parameters, stop conditions, logprobs and streaming through the offline Engine."""

import pytest
import torch
import transformers

pytestmark = pytest.mark.slow  # engines on a tiny model

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = "The quick brown fox jumps over the lazy dog. Then"


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(tiny_engine):
    params = {"temperature": 1.0, "max_new_tokens": 12, "sampling_seed": 1234, "ignore_eos": True}
    a = tiny_engine.generate(PROMPT, params)
    b = tiny_engine.generate(PROMPT, params)
    c = tiny_engine.generate(PROMPT, {**params, "sampling_seed": 99})
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]
    outs = tiny_engine.generate(PROMPT, {**params, "n": 3})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) == 3


def test_top_k_1_equals_greedy_and_top_p_small_equals_greedy(tiny_engine):
    greedy = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 8})["output_ids"]
    top_k = tiny_engine.generate(PROMPT, {"temperature": 0.8, "top_k": 1, "max_new_tokens": 8, "ignore_eos": True})
    top_p = tiny_engine.generate(PROMPT, {"temperature": 0.8, "top_p": 1e-6, "max_new_tokens": 8, "ignore_eos": True})
    assert top_k["output_ids"] == greedy == top_p["output_ids"]


def test_stop_string_is_trimmed(tiny_engine):
    full = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 24})
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    out = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 24, "stop": stop})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]
    kept = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 24, "stop": [stop], "no_stop_trim": True})
    assert stop in kept["text"]


def test_the_stop_string_that_starts_first_wins_within_one_token(tiny_engine):
    full = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 24})
    ids, decode = full["output_ids"], tiny_engine.tokenizer.decode
    for i in range(len(ids)):
        prefix, text = decode(ids[:i]), decode(ids[: i + 1])
        piece = text[len(prefix) :]
        # a token of 3+ characters: two stops that both first appear inside it, one starting later
        if len(piece) >= 3 and text.find(piece[:2]) == len(prefix) and text.find(piece[1:]) == len(prefix) + 1:
            break
    else:
        raise AssertionError(f"no token of 3+ characters in {full['text']!r}")
    late, early = piece[1:], piece[:2]
    out = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 24, "stop": [late, early]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": early}
    assert out["text"] == prefix


def test_stop_token_ids_and_min_new_tokens(tiny_engine):
    full = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 16})["output_ids"]
    stop_id = full[3]
    first = full.index(stop_id)
    out = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 16, "stop_token_ids": [stop_id]})
    assert out["output_ids"] == full[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    held = tiny_engine.generate(
        PROMPT, {**GREEDY, "max_new_tokens": 16, "stop_token_ids": [stop_id], "min_new_tokens": 10}
    )
    assert len(held["output_ids"]) >= 10
    assert stop_id not in held["output_ids"][:10]


def test_eos_ignore_eos_and_special_tokens(tiny_engine):
    eos = 2
    force_eos = {"temperature": 0, "max_new_tokens": 5, "logit_bias": {str(eos): 100.0}}
    stopped = tiny_engine.generate(PROMPT, force_eos)
    assert stopped["output_ids"] == [eos]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert stopped["text"] == ""
    ignored = tiny_engine.generate(PROMPT, {**force_eos, "ignore_eos": True})
    assert ignored["output_ids"] == [eos] * 5
    assert ignored["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    shown = tiny_engine.generate(PROMPT, {**force_eos, "skip_special_tokens": False, "ignore_eos": True})
    assert "<|im_end|>" in shown["text"]


def test_frequency_penalty_reduces_repetition(tiny_engine):
    plain = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 40})["output_ids"]
    penalized = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 40, "frequency_penalty": 2.0})["output_ids"]
    assert len(set(penalized)) > len(set(plain))


def test_prefill_only_request_returns_input_logprobs_matching_transformers(tiny_engine, tiny_llama):
    ids = tiny_engine.tokenizer.encode(PROMPT)
    out = tiny_engine.generate(
        input_ids=ids,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert out["text"] == "" and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    entries = meta["input_token_logprobs"]
    assert len(entries) == len(ids) and entries[0][0] is None
    assert [e[1] for e in entries] == ids and all(isinstance(e[2], str) for e in entries)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([e[0] for e in entries[1:]]), expected, atol=1e-4)
    tops = meta["input_top_logprobs"]
    assert tops[0] is None and all(len(t) == 2 and t[0][0] >= t[1][0] for t in tops[1:])


def test_logprob_window_and_output_logprobs(tiny_engine):
    ids = tiny_engine.tokenizer.encode(PROMPT)
    out = tiny_engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "max_new_tokens": 6},
        return_logprob=True,
        logprob_start_len=len(ids) - 3,
        top_logprobs_num=3,
    )
    meta = out["meta_info"]
    whole = tiny_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True)
    whole = whole["meta_info"]["input_token_logprobs"]  # prefill-only: the whole prompt by default
    assert len(whole) == len(ids) and whole[0][0] is None  # position 0 has no context
    window = meta["input_token_logprobs"]
    assert len(window) == 3 and [e[1] for e in window] == ids[-3:]
    # the window's first token is scored given everything before it, like the rest
    assert [e[0] for e in window] == pytest.approx([e[0] for e in whole[-3:]], abs=1e-5)
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[2] is None for e in meta["output_token_logprobs"])
    for entry, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == entry[1]  # greedy picks the most likely token
        assert top[0][0] == pytest.approx(entry[0], abs=1e-6)
    only_output = tiny_engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 3}, return_logprob=True)
    assert only_output["meta_info"]["input_token_logprobs"] == []
    assert len(only_output["meta_info"]["output_token_logprobs"]) == 3


def test_stream_chunks_are_cumulative_and_end_like_the_plain_call(tiny_engine):
    params = {**GREEDY, "max_new_tokens": 10}
    chunks = list(tiny_engine.generate(PROMPT, params, stream=True))
    plain = tiny_engine.generate(PROMPT, params)
    assert len(chunks) >= 2
    for before, after in zip(chunks, chunks[1:]):
        assert after["text"].startswith(before["text"])
    assert chunks[-1]["text"] == plain["text"] and chunks[-1]["output_ids"] == plain["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    "params,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_p": 2}, "min_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(tiny_engine, params, field):
    with pytest.raises(ValueError, match=field):
        tiny_engine.generate(PROMPT, params)


def test_bad_inputs_raise_clear_errors(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.generate("", {"max_new_tokens": 1})
    with pytest.raises(ValueError, match="context length"):
        tiny_engine.generate(input_ids=[5] * 5000, sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="input_ids"):
        tiny_engine.generate(input_ids=[5, -1], sampling_params={"max_new_tokens": 1})
