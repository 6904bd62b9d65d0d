"""Constrained decoding on CPU: grammar checks, the compile cache, matchers, the bitmask in the
sampler, and a Scheduler whose requests follow a regex (the fake forward of test_scheduler)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import xgrammar
from sglang.srt.constrained.grammar_backend import Grammar, GrammarBackend, allocate_bitmask
from sglang.srt.layers import sampler as sampler_module
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers.output_processor import OutputProcessor
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo, TokenBitmask
from sglang.srt.sampling.sampling_params import SamplingParams
from test_scheduler import EOS, FILLER, VOCAB, Harness

# A character vocabulary: token i is chr(ord('a') + i), as test_scheduler's CharTokenizer
# decodes it; EOS (token 2, "c") is the stop token. The model's vocabulary is larger than the
# tokenizer's: the last 4 ids have no text and no grammar ever allows them.
TOKEN_TEXTS = [chr(ord("a") + i) for i in range(VOCAB - 4)]
REGEX = "[d-h]{3}x"  # FILLER is "f": the fake model's favourite fits the first three places
X = ord("x") - ord("a")


def make_backend(**kwargs) -> GrammarBackend:
    info = xgrammar.TokenizerInfo(TOKEN_TEXTS, vocab_size=VOCAB, stop_token_ids=[EOS])
    return GrammarBackend(info, **kwargs)


def compiled(backend: GrammarBackend, kind: str, text: str):
    return backend.submit((kind, text)).result(timeout=30)


def allowed(grammar: Grammar) -> list[int]:
    bitmask = allocate_bitmask(1, VOCAB)
    grammar.fill_next_token_bitmask(bitmask, 0)
    return [t for t in range(VOCAB) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]


def tokens(text: str) -> list[int]:
    return [ord(ch) - ord("a") for ch in text]


# ---- validation at the boundary ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("regex", "[0-9", "regex is not a valid grammar: Regex parsing error"),
        ("json_schema", "{", "json_schema is not valid JSON"),
        ("json_schema", '{"type": "blah"}', 'json_schema is not a valid grammar: Unsupported type "blah"'),
        ("ebnf", "root ::= foo", 'ebnf is not a valid grammar: EBNF parser error at line 1, column 10: Rule "foo"'),
        ("regex", 5, "'regex' must be a str"),
    ],
)
def test_bad_grammar_is_a_value_error_naming_the_field(name, value, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams.from_dict({name: value}).verify(vocab_size=VOCAB)
    assert message in str(excinfo.value)


def test_two_grammars_are_a_value_error_naming_both():
    with pytest.raises(ValueError, match="regex and json_schema are mutually exclusive"):
        SamplingParams.from_dict({"regex": "a", "json_schema": "{}"})


def test_stop_regex_stays_rejected():
    with pytest.raises(ValueError, match="stop_regex is not supported yet"):
        SamplingParams.from_dict({"regex": "a+", "stop_regex": "b"})


def test_tokenizer_manager_rejects_grammars_when_disabled():
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    tm = TokenizerManager(None, vocab_size=VOCAB, context_len=64, random_seed=0, grammar_backend="none")
    ok = GenerateReqInput(input_ids=[1, 2], sampling_params={"max_new_tokens": 2})
    assert len(tm.tokenize(ok)) == 1
    bad = GenerateReqInput(input_ids=[1, 2], sampling_params={"regex": "a+"})
    with pytest.raises(ValueError, match=r"structured output is disabled \(--grammar-backend none\)"):
        tm.tokenize(bad)


# ---- compiling -----------------------------------------------------------------------------


def test_compile_runs_off_thread_and_is_cached():
    backend = make_backend(cache_size=2)
    threads = []
    compile_on_pool = backend._compile
    backend._compile = lambda key: threads.append(threading.current_thread()) or compile_on_pool(key)
    first = backend.submit(("regex", "a+"))
    assert backend.submit(("regex", "a+")) is first and backend.num_cache_hits == 1
    first.result(timeout=30)
    assert threads == [threads[0]] and threads[0] is not threading.current_thread()
    backend.submit(("regex", "b+"))
    backend.submit(("ebnf", 'root ::= "a"'))  # evicts the least recently used: a+
    again = backend.submit(("regex", "a+"))
    assert again is not first
    again.result(timeout=30)  # one worker: the compiles ran in order
    assert len(threads) == 4 and backend.num_cache_hits == 1
    backend.shutdown()


def test_compile_failure_is_a_value_error_in_the_future():
    backend = make_backend()
    future = backend.submit(("regex", "[0-9"))
    with pytest.raises(ValueError, match="regex does not compile: Regex parsing error"):
        future.result(timeout=30)


# ---- matchers ------------------------------------------------------------------------------


def test_matcher_accepts_terminates_and_rebuilds():
    backend = make_backend()
    grammar = Grammar(compiled(backend, "regex", REGEX))
    assert allowed(grammar) == tokens("defgh")
    for t in tokens("dfh"):
        assert grammar.accept_token(t)
    assert allowed(grammar) == [X]
    assert not grammar.accept_token(FILLER)  # rejected, and nothing changes
    assert grammar.accept_token(X) and not grammar.is_terminated()
    assert allowed(grammar) == [EOS]
    assert grammar.accept_token(EOS) and grammar.is_terminated()

    fresh = Grammar(compiled(backend, "regex", REGEX))
    fresh.rebuild(tokens("dfh"))
    assert allowed(fresh) == [X]
    with pytest.raises(ValueError, match="rejects output token 1"):
        fresh.rebuild(tokens("dx"))


def test_json_schema_matcher_follows_the_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    # a JSON-capable vocabulary: every printable ASCII character, token 0 the stop token
    texts = ["<eos>"] + [chr(c) for c in range(32, 127)]
    info = xgrammar.TokenizerInfo(texts, vocab_size=len(texts), stop_token_ids=[0])
    grammar = Grammar(GrammarBackend(info).submit(("json_schema", json.dumps(schema))).result(timeout=30))
    for ch in '{"a": 12}':
        assert grammar.accept_token(texts.index(ch)), ch
    assert not grammar.accept_token(texts.index("x"))
    assert grammar.accept_token(0) and grammar.is_terminated()


# ---- the bitmask in the sampler ------------------------------------------------------------


def _sample_with_mask(logits: torch.Tensor, params: list[SamplingParams], masked_rows: list[int], bitmask):
    n = len(params)
    info = SamplingBatchInfo.build(
        params,
        seeds=list(range(n)),
        steps=[0] * n,
        output_ids=[[] for _ in range(n)],
        input_ids=[[1] for _ in range(n)],
        banned_token_ids=[None] * n,
        vocab_size=logits.shape[1],
        device=logits.device,
        token_bitmask=(masked_rows, bitmask),
    )
    return Sampler()(logits, info).next_token_ids


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_disallowed_best_token_is_never_chosen(temperature):
    vocab = 40  # two bitmask words, the second one partial
    logits = torch.zeros(2, vocab)
    logits[:, 3] = 50.0  # the best token by far, disallowed in row 0
    logits[:, 35] = 1.0
    bitmask = allocate_bitmask(1, vocab)
    bitmask.zero_()
    bitmask[0, 0] = (1 << 5) | (1 << 7)
    bitmask[0, 1] = 1 << (35 - 32)
    params = [SamplingParams(temperature=temperature) for _ in range(2)]
    for p in params:
        p.normalize()
    for seed in range(20):
        logits[:, 5] = float(seed % 3)
        chosen = _sample_with_mask(logits, params, [0], bitmask.clone()).tolist()
        assert chosen[0] in (5, 7, 35)
        assert chosen[1] == 3  # the row without a grammar is untouched
    if temperature == 0.0:
        logits[:, 5] = 2.0
        assert _sample_with_mask(logits, params, [0], bitmask).tolist() == [5, 3]


@pytest.mark.parametrize("masked_rows", [[0, 1, 2, 3], [1, 3], [0]])
def test_bitmask_masks_exactly_the_disallowed_tokens(masked_rows):
    # all rows with a grammar take the in-place path, some of them the gather-scatter one
    vocab = 70  # three words, the last one partial
    gen = torch.Generator().manual_seed(len(masked_rows))
    logits = torch.randn(4, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(masked_rows), 3), dtype=torch.int32, generator=gen)
    bitmask[0, 1] = 0  # a word with nothing allowed
    x = logits.clone()
    sampler_module.apply_token_bitmask(x, TokenBitmask(rows=torch.tensor(masked_rows), bitmask=bitmask))
    expected = logits.clone()
    for i, row in enumerate(masked_rows):
        for token in range(vocab):
            if not (int(bitmask[i, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    assert torch.equal(x, expected) and x.isinf().any()


def test_bitmask_follows_the_logits_device():
    params = SamplingParams(temperature=1.0, regex=REGEX)
    params.normalize()
    reqs = [Req(f"r{i}", [4, 5], params, seed=i) for i in range(2)]
    reqs[1].grammar = Grammar(compiled(make_backend(), "regex", REGEX))
    built: list[SamplingBatchInfo] = []
    original_build = SamplingBatchInfo.build

    def record(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    SamplingBatchInfo.build = record
    try:
        logits = LogitsProcessorOutput(next_token_logits=torch.randn(2, VOCAB, device="meta"))
        try:
            OutputProcessor(None, {EOS}, VOCAB).sample(ScheduleBatch([ScheduledReq(r, 1, True) for r in reqs]), logits)
        except (RuntimeError, NotImplementedError) as exc:
            assert "is not on the expected device" not in str(exc)
            assert "meta tensor" in str(exc) or "meta tensors" in str(exc), exc
    finally:
        SamplingBatchInfo.build = original_build
    mask = built[0].token_bitmask
    assert mask.rows.device.type == "meta" and mask.bitmask.device.type == "meta"
    assert mask.bitmask.shape == (1, (VOCAB + 31) // 32)


# ---- through the scheduler -----------------------------------------------------------------


def make_harness(**kwargs) -> Harness:
    h = Harness(**kwargs)
    h.sched.grammar_backend = make_backend()
    h.sched.output.eos_token_ids = {EOS}
    return h


def test_scheduler_constrained_request_finishes_at_the_grammar_end():
    h = make_harness()
    h.add("free", 3, max_new_tokens=3)
    h.add("re", 3, max_new_tokens=10, regex=REGEX)
    h.add("short", 3, max_new_tokens=2, regex=REGEX)
    h.run()
    assert h.outputs["free"] == [FILLER] * 3
    # the fake model wants FILLER ("f") everywhere; the grammar then forces "x" and the end
    assert h.outputs["re"] == tokens("fffx") + [EOS]
    assert h.finished["re"] == {"type": "stop", "matched": EOS}
    assert h.outputs["short"] == tokens("ff") and h.finished["short"] == {"type": "length", "length": 2}
    h.assert_pool_back()


def test_scheduler_grammar_ends_even_with_ignore_eos():
    h = make_harness()
    h.add("re", 3, max_new_tokens=10, regex=REGEX, ignore_eos=True)
    h.run()
    assert h.outputs["re"] == tokens("fffx") + [EOS] and h.finished["re"] == {"type": "stop", "matched": EOS}


def test_scheduler_grammar_end_wins_over_min_new_tokens():
    h = make_harness()
    # after "fffx" the grammar allows only EOS, which min_new_tokens would ban
    h.add("re", 3, max_new_tokens=10, min_new_tokens=8, regex=REGEX)
    h.run()
    assert h.outputs["re"] == tokens("fffx") + [EOS] and h.finished["re"] == {"type": "stop", "matched": EOS}
    h.assert_pool_back()


def test_allows_other_than_reads_every_bit_of_a_word():
    from sglang.srt.constrained.grammar_backend import allows_other_than

    row = allocate_bitmask(1, 96)[0].zero_()
    for token in (31, 63, 64):  # bit 31 is an int32's sign bit
        row[token // 32] |= torch.tensor(1 << (token % 32), dtype=torch.int64).to(torch.int32)
        assert not allows_other_than(row, [31, 63, 64]) and allows_other_than(row, [5])
    assert allows_other_than(row, [31, 63]) and not allows_other_than(row.zero_(), [])


def test_tp_replica_admits_a_constrained_request_in_the_step_that_received_it():
    import time

    h = make_harness()
    h.sched.wait_for_grammars = True  # TP replicas: each compiles on its own thread, all must agree
    compile_on_pool = h.sched.grammar_backend._compile
    h.sched.grammar_backend._compile = lambda key: time.sleep(0.2) or compile_on_pool(key)
    h.add("re", 3, max_new_tokens=10, regex=REGEX)
    assert h.step() == [("re", 3, True)]
    h.run()
    assert h.outputs["re"] == tokens("fffx") + [EOS]


def test_scheduler_compile_failure_aborts_the_request():
    h = make_harness()
    h.sched.grammar_backend._compile = lambda key: (_ for _ in ()).throw(ValueError("regex does not compile: boom"))
    h.add("re", 3, regex=REGEX)
    h.add("free", 3, max_new_tokens=2)
    h.run()
    assert h.finished["re"] == {"type": "abort", "message": "regex does not compile: boom"}
    assert h.outputs["free"] == [FILLER] * 2
    h.assert_pool_back()


def test_scheduler_without_backend_aborts_constrained_requests():
    h = Harness()
    h.add("re", 3, regex=REGEX)
    h.run()
    assert h.finished["re"] == {"type": "abort", "message": "structured output is disabled (--grammar-backend none)"}


def test_scheduler_abort_while_compiling():
    from sglang.srt.managers.io_struct import AbortReq

    h = make_harness()
    h.add("re", 3, regex=REGEX)
    assert [r.rid for r in h.sched.grammar_queue] == ["re"]
    h.sched.handle(AbortReq(rid="re", message="bye"))
    h.run()
    assert h.finished["re"] == {"type": "abort", "message": "bye"} and not h.sched.grammar_queue
    h.assert_pool_back()


def test_scheduler_retraction_keeps_the_grammar_state():
    # 2 requests of 10 + 8 tokens in 24 slots: the second is retracted mid-output and resumes
    h = make_harness(total_tokens=24)
    h.add("a", 10, max_new_tokens=9, regex="[d-h]{6}x")
    h.add("b", 10, max_new_tokens=9, regex="[d-h]{6}x")
    h.run()
    assert h.sched.num_retractions >= 1
    for rid in "ab":
        assert h.outputs[rid] == tokens("ffffffx") + [EOS], rid
        assert h.finished[rid] == {"type": "stop", "matched": EOS}
    h.assert_pool_back()
