"""Incremental text with the default model's real (byte-level BPE) tokenizer, read from the
GGUF file that ships with the package: no download, no model.

Outputs are made as the scheduler makes them (OutputProcessor checks each new token for stop
strings and builds the deltas), then turned into text by the DetokenizerManager.
"""

from __future__ import annotations

import pytest
import torch
from sglang.srt.layers.sampler import SamplerOutput
from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import BatchTokenIDOut, ReqOutput
from sglang.srt.managers.output_processor import OutputProcessor
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq
from sglang.srt.sampling.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    from sglang.srt.model_loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _generate(tokenizer, token_ids: list[int], stream: bool = True, **params) -> tuple[list[ReqOutput], Req]:
    """Feeds `token_ids` as if sampled one per step; returns the outputs the scheduler would
    send (one per step when streaming, else only the last) and the request."""
    params.setdefault("max_new_tokens", len(token_ids) + 10)
    sampling = SamplingParams(**params)
    sampling.normalize(tokenizer)
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))
    req = Req("r", [1], sampling, seed=0, stream=stream)
    outputs = []
    for token in token_ids:
        batch = ScheduleBatch([ScheduledReq(req, 1, samples=True)])
        sampled = SamplerOutput(torch.tensor([token]), None, None)
        [(_, reason)] = processor.process(batch, None, sampled)
        req.finished_reason = reason
        if reason is not None or stream:
            outputs.append(processor.make_output(req))
        if reason is not None:
            break
    return outputs, req


def _deltas(tokenizer, outputs: list[ReqOutput]) -> list[str]:
    manager = DetokenizerManager(tokenizer)
    deltas = [manager.handle(BatchTokenIDOut([out])).outputs[0].text_delta for out in outputs]
    if outputs and outputs[-1].finished_reason is not None:
        assert not manager.states, "a finished request's state is dropped"
    return deltas


def _regroup(outputs: list[ReqOutput], sizes: list[int]) -> list[ReqOutput]:
    """The same token stream in chunks of `sizes` tokens (the last chunk carries the finish)."""
    ids = [t for out in outputs for t in out.new_token_ids]
    assert sum(sizes) == len(ids)
    chunks, start = [], 0
    for n in sizes:
        last = start + n == len(ids)
        chunks.append(
            ReqOutput(
                rid=outputs[0].rid,
                new_token_ids=ids[start : start + n],
                finished_reason=outputs[-1].finished_reason if last else None,
                prompt_tokens=1,
                completion_tokens=start + n,
                cached_tokens=0,
                stop_strings=outputs[0].stop_strings,
            )
        )
        start += n
    return chunks


# ---- held-back partial UTF-8 -------------------------------------------------------------


def test_a_character_split_across_tokens_waits_until_it_is_complete(tokenizer):
    ids = _ids(tokenizer, "Hi 😀😀 ok")
    # byte-level BPE: each emoji's 4 bytes span tokens, so decoding a prefix ends in U+FFFD
    assert tokenizer.decode(ids[:2]).endswith("\ufffd")
    outputs, _ = _generate(tokenizer, ids, max_new_tokens=len(ids), ignore_eos=True)
    deltas = _deltas(tokenizer, outputs)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "Hi 😀😀 ok"
    # nothing of a character is sent before its last byte arrives; it then comes whole
    complete = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    for i, delta in enumerate(deltas):
        if complete[i].endswith("\ufffd"):
            assert delta == "", f"token {i} sent part of a character: {delta!r}"
    assert deltas[2] == " 😀"


def test_a_split_character_across_two_chunks_of_several_tokens(tokenizer):
    ids = _ids(tokenizer, "Hi 😀😀 ok")
    outputs, _ = _generate(tokenizer, ids, max_new_tokens=len(ids), ignore_eos=True)
    # the second emoji's first byte token ends chunk 1; its last two start chunk 2
    chunks = _regroup(outputs, [4, 3])
    first, second = _deltas(tokenizer, chunks)
    # chunk 1 may send at most its complete characters (today it waits for the whole chunk's
    # text to end on a complete character, and sends nothing)
    assert "Hi 😀".startswith(first) and "\ufffd" not in first + second
    assert first + second == "Hi 😀😀 ok"


# ---- stop strings ------------------------------------------------------------------------


def test_a_stop_string_spanning_two_tokens_is_caught_and_the_text_cut_before_it(tokenizer):
    ids = _ids(tokenizer, "Hello world peace and more")  # Hello | world | peace | and | more
    outputs, req = _generate(tokenizer, ids, stop="world peace")
    assert req.output_ids == ids[:3], "the request stops at the token that completes the stop string"
    assert outputs[-1].finished_reason == {"type": "stop", "matched": "world peace"}
    deltas = _deltas(tokenizer, outputs)
    # "world" may begin the stop string, so it is held back and never sent
    assert deltas == ["Hello", " ", ""]


def test_a_stop_string_inside_tokens_cuts_mid_token(tokenizer):
    ids = _ids(tokenizer, "Hello world peace and more")
    outputs, req = _generate(tokenizer, ids, stop=["orld pe"])
    assert req.output_ids == ids[:3]
    # the "o" of "Hello" may begin "orld pe" too: held back until " world" rules it out
    assert _deltas(tokenizer, outputs) == ["Hell", "o w", ""]


@pytest.mark.parametrize("sizes", [[1, 2], [2, 1], [3]])
def test_a_stop_string_across_chunk_boundaries_of_a_non_streamed_batch(tokenizer, sizes):
    ids = _ids(tokenizer, "Hello world peace and more")
    outputs, _ = _generate(tokenizer, ids, stop="world peace")
    assert "".join(_deltas(tokenizer, _regroup(outputs, sizes))) == "Hello "


def test_held_back_text_is_released_when_no_stop_string_follows(tokenizer):
    ids = _ids(tokenizer, "Hello world peace and more")
    outputs, req = _generate(tokenizer, ids, stop="world war")
    assert req.output_ids == ids and req.finished_reason is None
    assert _deltas(tokenizer, outputs) == ["Hello", " ", "world peace", " and", " more"]


def test_no_stop_trim_keeps_the_stop_string(tokenizer):
    ids = _ids(tokenizer, "Hello world peace and more")
    outputs, _ = _generate(tokenizer, ids, stop="world peace", no_stop_trim=True)
    assert "".join(_deltas(tokenizer, outputs)) == "Hello world peace"


def test_a_stop_token_is_dropped_from_the_text_unless_no_stop_trim(tokenizer):
    eos = tokenizer.eos_token_id
    ids = _ids(tokenizer, "Hello world") + [eos]
    for no_stop_trim, text in ((False, "Hello world"), (True, "Hello world" + tokenizer.decode([eos]))):
        outputs, _ = _generate(tokenizer, ids, skip_special_tokens=False, no_stop_trim=no_stop_trim)
        assert outputs[-1].finished_reason == {"type": "stop", "matched": eos}
        assert "".join(_deltas(tokenizer, outputs)) == text


def test_a_non_streamed_request_gets_its_whole_text_once(tokenizer):
    ids = _ids(tokenizer, "Hi 😀 world peace")
    outputs, _ = _generate(tokenizer, ids, stream=False, stop="peace")
    assert len(outputs) == 1
    assert _deltas(tokenizer, outputs) == ["Hi 😀 world "]


class _BrokenOnNine:
    """Token i decodes to chr(ord('a') + i), except 9, which raises."""

    def decode(self, ids, **_):
        if 9 in ids:
            raise OverflowError("out of range integral type conversion attempted")
        return "".join(chr(ord("a") + i) for i in ids)


def _out(rid: str, ids: list[int], finished: bool = False) -> ReqOutput:
    reason = {"type": "length", "length": 3} if finished else None
    return ReqOutput(rid, ids, reason, prompt_tokens=1, completion_tokens=len(ids), cached_tokens=0)


def test_a_request_that_cannot_be_decoded_is_aborted_and_the_others_go_on():
    manager = DetokenizerManager(_BrokenOnNine())
    first = manager.handle(BatchTokenIDOut([_out("bad", [9]), _out("ok", [0])])).outputs
    assert first[0].out.rid == "bad" and first[0].text_delta == ""
    reason = first[0].out.finished_reason
    assert reason["type"] == "abort" and "internal error: OverflowError" in reason["message"]
    assert first[1].text_delta == "a" and first[1].out.finished_reason is None
    # the scheduler still runs "bad": its later outputs are dropped, the final one too
    later = manager.handle(BatchTokenIDOut([_out("bad", [1]), _out("ok", [1, 2], finished=True)])).outputs
    assert [o.out.rid for o in later] == ["ok"] and later[0].text_delta == "bc"
    assert manager.handle(BatchTokenIDOut([_out("bad", [2], finished=True)])).outputs == []
    assert not manager.states and not manager.failed
