"""SamplingBatchInfo.build and the Sampler: processed logits, seeded draws, filters, logprobs."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from sglang.srt.layers import sampler as sampler_module
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.sampler import (
    Sampler,
    SamplerOutput,
    inverse_cdf,
    mix64,
    process_logits,
    seeded_uniforms,
    sorted_candidates,
)
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 16


def make_info(
    params: list[SamplingParams],
    vocab_size: int = VOCAB,
    seeds: Optional[list[int]] = None,
    steps: Optional[list[int]] = None,
    output_ids: Optional[list[list[int]]] = None,
    input_ids: Optional[list[list[int]]] = None,
    banned: Optional[list[Optional[list[int]]]] = None,
) -> SamplingBatchInfo:
    num_rows = len(params)
    return SamplingBatchInfo.build(
        params,
        seeds=seeds if seeds is not None else list(range(num_rows)),
        steps=steps if steps is not None else [0] * num_rows,
        output_ids=output_ids if output_ids is not None else [[] for _ in range(num_rows)],
        input_ids=input_ids if input_ids is not None else [[] for _ in range(num_rows)],
        banned_token_ids=banned if banned is not None else [None] * num_rows,
        vocab_size=vocab_size,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kwargs: Any) -> torch.Tensor:
    info = make_info(params, vocab_size=logits.shape[1], **kwargs)
    return Sampler()(logits, info).next_token_ids


def random_logits(num_rows: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 2


# --- SamplingBatchInfo.build ----------------------------------------------------------------


def test_build_all_greedy_skips_optional_work() -> None:
    info = make_info([SamplingParams(temperature=0.0), SamplingParams(top_k=1)])
    assert info.is_all_greedy and info.sample_rows is None
    assert not (info.need_top_p_top_k or info.need_min_p or info.needs_logit_processing)
    assert info.penalties is None and info.logit_bias is None and info.banned is None


def test_build_tensors() -> None:
    params = [
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.5, top_k=-1, top_p=0.9, min_p=0.1),
        SamplingParams(top_k=1000, repetition_penalty=1.2),
    ]
    info = make_info(params, seeds=[1, -1, 1 << 64], output_ids=[[1], [2], [3, 3]])
    assert info.temperatures.shape == (3, 1) and info.temperatures.dtype == torch.float32
    assert info.temperatures.squeeze(1).tolist() == [1.0, 0.5, 1.0]
    assert info.top_ks.tolist() == [1, VOCAB, VOCAB]
    assert info.seeds.tolist() == [1, -1, 0]  # wrapped to int64
    assert info.greedy_rows.tolist() == [0] and info.sample_rows.tolist() == [1, 2]
    assert info.sorted_rows.tolist() == [1] and info.unsorted_rows.tolist() == [2]
    assert info.need_top_p_top_k and info.need_min_p
    # Row 2's output [3, 3], flat in the [3, VOCAB] logits; one entry per occurrence.
    assert info.penalties.seen_ids.tolist() == [2 * VOCAB + 3] * 2
    assert info.penalties.repetition_penalties.tolist() == pytest.approx([1.2, 1.2])
    assert info.penalties.output_ids is None  # no frequency/presence penalty in the batch


def test_build_output_counts() -> None:
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=0.1)]
    info = make_info(params, output_ids=[[4, 2, 4], []], input_ids=[[1], [1]])
    assert info.penalties.seen_ids is None  # no repetition penalty in the batch
    assert info.penalties.output_ids.tolist() == [4, 2, 4]
    assert info.penalties.output_counts.tolist() == [2.0, 1.0, 2.0]
    assert info.penalties.frequency_penalties.tolist() == [0.5] * 3


# --- processed logits and greedy ------------------------------------------------------------


def test_greedy_is_argmax_with_lowest_index_on_ties() -> None:
    logits = random_logits(4)
    logits[3] = 0.0
    logits[3, 5] = logits[3, 9] = 1.0
    params = [SamplingParams(temperature=0.0)] * 4
    for seed in (0, 12345):
        assert sample(logits, params, seeds=[seed] * 4).tolist() == [
            *logits[:3].argmax(-1).tolist(),
            5,
        ]


def test_banned_tokens_are_never_chosen() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 10.0
    logits[:, 4] = 9.0
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    for seed in range(20):
        chosen = sample(logits, params, seeds=[seed, seed], banned=[[3, 4], [3]])
        assert chosen[0] not in (3, 4) and chosen[1] != 3


def test_logit_bias_shifts_choice() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 1.0
    assert sample(logits, [SamplingParams(temperature=0.0)]).item() == 2
    params = SamplingParams(temperature=0.0, logit_bias={"7": 1.5})
    assert sample(logits, [params]).item() == 7
    processed = process_logits(logits, make_info([params]))
    assert processed[0, 7].item() == 1.5 and processed[0, 2].item() == 1.0
    assert logits[0, 7].item() == 0.0  # the caller's logits are untouched


# Vocab 5, logits [1, -1, 2, 0.5, -2]; prompt [3], output [0, 0, 1].
PENALTY_LOGITS = [1.0, -1.0, 2.0, 0.5, -2.0]


@pytest.mark.parametrize(
    "penalties, expected",
    [
        # frequency 0.5: token 0 seen twice, token 1 once in the output; prompt ignored.
        ({"frequency_penalty": 0.5}, [0.0, -1.5, 2.0, 0.5, -2.0]),
        # presence 0.3: once per distinct output token.
        ({"presence_penalty": 0.3}, [0.7, -1.3, 2.0, 0.5, -2.0]),
        # repetition 1.5 over prompt + output: positive / 1.5, negative * 1.5.
        ({"repetition_penalty": 1.5}, [1 / 1.5, -1.5, 2.0, 0.5 / 1.5, -2.0]),
        (
            {"frequency_penalty": 0.5, "presence_penalty": 0.3, "repetition_penalty": 1.5},
            [1 / 1.5 - 1.0 - 0.3, -1.5 - 0.5 - 0.3, 2.0, 0.5 / 1.5, -2.0],
        ),
    ],
)
def test_penalties_match_hand_computation(penalties: dict[str, float], expected: list[float]) -> None:
    logits = torch.tensor([PENALTY_LOGITS, PENALTY_LOGITS])
    params = [SamplingParams(), SamplingParams(**penalties)]  # row 0 has no penalty
    info = make_info(params, vocab_size=5, output_ids=[[0, 0, 1], [0, 0, 1]], input_ids=[[3], [3]])
    processed = process_logits(logits, info)
    torch.testing.assert_close(processed[1], torch.tensor(expected))
    torch.testing.assert_close(processed[0], logits[0])


def test_repeated_tokens_are_penalized_once() -> None:
    # Token 0 is in the prompt once and the output twice, token 2 twice in the prompt.
    logits = torch.tensor([PENALTY_LOGITS])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.25)
    info = make_info([params], vocab_size=5, output_ids=[[0, 0]], input_ids=[[0, 2, 2]])
    expected = [1.0 / 1.5 - 0.25, -1.0, 2.0 / 1.5, 0.5, -2.0]
    torch.testing.assert_close(process_logits(logits, info)[0], torch.tensor(expected))


def test_greedy_follows_penalties() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    assert sample(logits, [params], output_ids=[[0]]).item() == 1


# --- seeded sampling ------------------------------------------------------------------------


def test_mix64_matches_splitmix64_reference() -> None:
    mask = (1 << 64) - 1

    def reference(z: int) -> int:
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    inputs = [0, 1, 12345, -1, -(1 << 63), (1 << 63) - 1, 0x1234_5678_9ABC_DEF0]
    got = mix64(torch.tensor(inputs, dtype=torch.int64)).tolist()
    assert [g & mask for g in got] == [reference(x) for x in inputs]


def test_seeded_uniforms_match_splitmix64_reference() -> None:
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def reference(seed: int, step: int) -> float:
        # Output `step` of the SplitMix64 stream whose state starts at mix(seed).
        bits = mix((mix(seed & mask) + (step + 1) * 0x9E3779B97F4A7C15) & mask)
        return (bits >> 40) / 2**24

    seeds, steps = [0, 1, -1, 12345, (1 << 63) - 1], [0, 7, 3, 100, 1 << 20]
    got = seeded_uniforms(torch.tensor(seeds), torch.tensor(steps))
    assert got.dtype == torch.float32
    assert got.tolist() == [reference(a, b) for a, b in zip(seeds, steps)]


def test_uniforms_are_uniform() -> None:
    u = seeded_uniforms(torch.arange(100_000), torch.zeros(100_000, dtype=torch.int64))
    assert u.min() >= 0.0 and u.max() < 1.0
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert (histogram - 0.1).abs().max() < 0.005


# u = 1 never comes from seeded_uniforms; it stands for u * total rounding up to the total.
@pytest.mark.parametrize("u, expected", [(0.0, 1), (0.4999, 1), (0.5, 3), (1.0 - 2**-24, 3), (1.0, 3)])
def test_inverse_cdf_boundaries_skip_zero_probability(u: float, expected: int) -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]])
    chosen = inverse_cdf(probs, probs.cumsum(-1), None, torch.tensor([u]))
    assert chosen.tolist() == [expected]
    # Only the first four positions kept: the trailing zero is never chosen either.
    kept = inverse_cdf(probs, probs.cumsum(-1), torch.tensor([4]), torch.tensor([u]))
    assert kept.tolist() == [expected]


def test_inverse_cdf_stays_in_kept_prefix() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    for u, expected in ((0.0, 0), (0.7, 1), (1.0 - 2**-24, 1), (1.0, 1)):
        chosen = inverse_cdf(probs, probs.cumsum(-1), torch.tensor([2]), torch.tensor([u]))
        assert chosen.item() == expected


def test_inverse_cdf_survives_a_scan_that_rounds_differently() -> None:
    # A parallel scan may round a zero-probability token's sum above its predecessor's.
    probs = torch.tensor([[0.5, 0.0, 0.5]])
    cumulative = torch.tensor([[0.5, 0.5000001, 1.0]])
    assert inverse_cdf(probs, cumulative, None, torch.tensor([0.5])).item() == 0


def test_banned_edges_with_extreme_uniforms() -> None:
    seeds = torch.arange(1 << 20)
    u = seeded_uniforms(seeds, torch.zeros_like(seeds))
    high, low = int(u.argmax()), int(u.argmin())
    assert u[high] > 1 - 1e-4 and u[low] < 1e-4
    logits = torch.zeros(2, VOCAB)  # uniform: the draw is decided by u alone
    params = [SamplingParams(), SamplingParams(min_p=0.5)]
    banned = [[0, VOCAB - 2, VOCAB - 1]] * 2
    assert sample(logits, params, seeds=[high] * 2, banned=banned).tolist() == [VOCAB - 3] * 2
    assert sample(logits, params, seeds=[low] * 2, banned=banned).tolist() == [1] * 2


def test_same_seed_and_step_same_token() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any dependence on the key shows
    params = [SamplingParams()]
    first = sample(logits, params, seeds=[42], steps=[7])
    assert sample(logits, params, seeds=[42], steps=[7]) == first
    draws = {sample(logits, params, seeds=[42], steps=[step]).item() for step in range(20)}
    assert len(draws) > 15  # the step changes the draw


def test_different_seeds_give_different_sequences() -> None:
    logits = torch.zeros(50, 100)
    params = [SamplingParams()] * 50
    steps = list(range(50))
    a = sample(logits, params, seeds=[1] * 50, steps=steps)
    b = sample(logits, params, seeds=[2] * 50, steps=steps)
    assert (a != b).sum() > 40


MIXED_PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.8, frequency_penalty=0.4),
    SamplingParams(temperature=0.9, min_p=0.05, repetition_penalty=1.3, logit_bias={"3": 2.0}),
    SamplingParams(top_k=8, top_p=0.9, min_p=0.02, presence_penalty=-0.5),
]


def test_tokens_do_not_depend_on_batch_composition() -> None:
    num_rows = len(MIXED_PARAMS)
    logits = random_logits(num_rows, vocab_size=64)
    seeds = [11, 22, 33, 44, 55, 66]
    steps = [0, 3, 5, 7, 9, 11]
    outputs = [[row % 64, (row * 7) % 64] for row in range(num_rows)]
    inputs = [[row + 10] for row in range(num_rows)]
    banned = [None, [4], None, [5, 6], None, None]

    def run(rows: list[int]) -> list[int]:
        return sample(
            logits[rows],
            [MIXED_PARAMS[r] for r in rows],
            seeds=[seeds[r] for r in rows],
            steps=[steps[r] for r in rows],
            output_ids=[outputs[r] for r in rows],
            input_ids=[inputs[r] for r in rows],
            banned=[banned[r] for r in rows],
        ).tolist()

    full = run(list(range(num_rows)))
    alone = [run([row])[0] for row in range(num_rows)]
    assert full == alone
    order = [4, 1, 5, 0, 3, 2]
    assert run(order) == [full[r] for r in order]
    assert run([5, 2]) == [full[5], full[2]]


def sampled_frequencies(
    logits_row: torch.Tensor, params: SamplingParams, num_draws: int, vary_step: bool = False
) -> torch.Tensor:
    """Empirical token frequencies over `num_draws` seeds (or steps of one seed)."""
    draws = range(num_draws)
    chosen = sample(
        logits_row.expand(num_draws, -1).contiguous(),
        [params] * num_draws,
        seeds=[7] * num_draws if vary_step else list(draws),
        steps=list(draws) if vary_step else [0] * num_draws,
    )
    return torch.bincount(chosen, minlength=logits_row.shape[0]).float() / num_draws


@pytest.mark.parametrize("vary_step", [False, True])
def test_empirical_distribution_matches_softmax(vary_step: bool) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    temperature = 0.8
    frequencies = sampled_frequencies(logits, SamplingParams(temperature=temperature), 4000, vary_step)
    expected = torch.softmax(logits / temperature, dim=-1)
    assert (frequencies - expected).abs().max() < 0.03


def test_top_k_keeps_k_most_likely_renormalized() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    frequencies = sampled_frequencies(logits, SamplingParams(top_k=3), 4000)
    expected = torch.zeros(8)
    expected[[4, 7, 0]] = torch.softmax(logits[[4, 7, 0]], dim=-1)
    assert (frequencies - expected).abs().max() < 0.03
    assert frequencies[[1, 2, 3, 5, 6]].sum() == 0


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    frequencies = sampled_frequencies(probs.log(), SamplingParams(top_p=0.75), 2000)
    # Mass above token 1 is 0.5 < 0.75, above token 2 it is 0.8: tokens 0 and 1 remain.
    assert frequencies[2:].sum() == 0
    assert abs(frequencies[0].item() - 0.5 / 0.8) < 0.04


def test_sorted_candidates_order_ties_by_token_id() -> None:
    probs = torch.tensor([[0.1, 0.3, 0.1, 0.3, 0.2, 0.0, 0.0]])
    for k in (5, 7):
        cand_probs, cand_ids = sorted_candidates(probs, k)
        assert cand_ids[0].tolist() == [1, 3, 4, 0, 2, 5, 6][:k]
        assert cand_probs[0].tolist() == pytest.approx([0.3, 0.3, 0.2, 0.1, 0.1, 0.0, 0.0][:k])


def test_candidate_sets_give_the_full_sort_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    # Coarse logits tie often, also at candidate-set edges; the flat rows' nuclei exceed the
    # first candidate set, so they are retried with more.
    vocab_size, num_rows = 3000, 8
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(num_rows, vocab_size, generator=generator) * 2).round()
    logits[4:] = torch.randint(0, 2, (4, vocab_size), generator=generator).float()
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40),
        SamplingParams(top_k=200, top_p=0.5),
        SamplingParams(top_p=0.8, min_p=0.2),
        SamplingParams(top_p=0.99),
        SamplingParams(temperature=0.5, top_p=0.95),
        SamplingParams(top_k=300),
        SamplingParams(top_k=120, top_p=0.97),
    ]
    rows = list(range(num_rows))
    for step in range(4):
        steps = [step] * num_rows
        batched = sample(logits, params, seeds=rows, steps=steps).tolist()
        alone = [sample(logits[[r]], [params[r]], seeds=[r], steps=[step]).item() for r in rows]
        assert batched == alone
        with monkeypatch.context() as patch:
            patch.setattr(sampler_module, "_first_num_candidates", lambda _, v: v)
            assert sample(logits, params, seeds=rows, steps=steps).tolist() == batched


def test_top_p_edge_tie_is_kept_in_token_id_order() -> None:
    # 255 likelier tokens, then 345 tied ones; top-p keeps exactly one of the tie, which
    # must be the lowest id (0), also when the first candidate set (256) cuts the tie.
    vocab_size, num_draws = 600, 3000
    logits = torch.zeros(vocab_size)
    logits[300:555] = 0.01
    frequencies = sampled_frequencies(logits, SamplingParams(top_p=0.428), num_draws)
    chosen = set(frequencies.nonzero().flatten().tolist())
    assert 0 in chosen and chosen <= {0, *range(300, 555)}


@pytest.mark.parametrize("num_padding", [0, 996])
def test_filters_over_large_vocab(num_padding: int) -> None:
    # Padding tokens of negligible probability move the filters onto partial candidate sets.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.cat([probs.log(), torch.full((num_padding,), -40.0)])
    for params in (SamplingParams(top_p=0.75), SamplingParams(top_k=2), SamplingParams(min_p=0.4)):
        frequencies = sampled_frequencies(logits, params, 2000)
        assert frequencies[2:].sum() == 0
        assert abs(frequencies[0].item() - 0.5 / 0.8) < 0.04


def test_tiny_top_p_and_top_k_one_are_argmax() -> None:
    logits = torch.tensor([0.3, 0.2, 0.35, 0.1, 0.05]).log()
    for params in (SamplingParams(top_p=1e-6), SamplingParams(top_k=1)):
        assert sampled_frequencies(logits, params, 500)[2] == 1.0


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    frequencies = sampled_frequencies(probs.log(), SamplingParams(min_p=0.4), 2000)
    # Threshold 0.4 * 0.5 = 0.2: tokens 0 and 1 remain, renormalized.
    assert frequencies[2:].sum() == 0
    assert abs(frequencies[0].item() - 0.5 / 0.8) < 0.04


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits() -> None:
    logits = random_logits(3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={"1": 100.0}),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=0.0),
    ]
    out: SamplerOutput = Sampler()(logits, make_info(params), True, [3, 0, 1])
    raw = torch.log_softmax(logits, dim=-1)
    assert out.next_token_ids[0].item() == 1  # chosen through the bias; logprob stays raw
    expected = raw.gather(1, out.next_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.next_token_logprobs, expected)
    assert out.top_logprobs[1] is None
    values, token_ids = out.top_logprobs[0]
    assert len(values) == len(token_ids) == 3 and values == sorted(values, reverse=True)
    assert token_ids == raw[0].topk(3).indices.tolist()
    torch.testing.assert_close(torch.tensor(values), raw[0, token_ids])
    assert out.top_logprobs[2][1] == [logits[2].argmax().item()]


def test_no_logprobs_unless_asked() -> None:
    out = Sampler()(random_logits(2), make_info([SamplingParams()] * 2))
    assert out.next_token_logprobs is None and out.top_logprobs is None
    assert out.next_token_ids.dtype == torch.int64 and out.next_token_ids.shape == (2,)


# --- device placement -------------------------------------------------------------------------

# A mix that builds every table: sampled (temperature, top-k/p, min-p, seeds), penalised,
# biased, and banned (min_new_tokens) rows, with logprobs.
_DEVICE_CASES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.8, min_p=0.05),
    "top-k-p": dict(temperature=0.8, top_k=5, top_p=0.5),
    "penalised": dict(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3),
    "biased": dict(temperature=0.7, logit_bias={"3": 5.0}),
    "banned": dict(temperature=0, min_new_tokens=4),
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


@pytest.mark.parametrize("case", list(_DEVICE_CASES))
def test_sampling_tables_follow_the_logits_device(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every table must sit beside the logits (they were built on the CPU, which would
    raise at the first op). The meta device checks devices op by op on this CPU-only build: with
    the logits on meta, the sampler may stop only where it reads values back (a real GPU syncs
    there), never at a device mismatch."""
    from sglang.srt.managers.output_processor import OutputProcessor
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq

    params = SamplingParams(max_new_tokens=8, **_DEVICE_CASES[case])
    params.normalize()
    reqs = [Req(f"r{i}", [4, 5, 6][: i + 1], params, seed=i, return_logprob=True, top_logprobs_num=2) for i in range(3)]
    reqs[1].output_ids = [1, 2]
    built: list[SamplingBatchInfo] = []
    original_build = SamplingBatchInfo.build
    monkeypatch.setattr(
        SamplingBatchInfo, "build", lambda *a, **kw: built.append(original_build(*a, **kw)) or built[-1]
    )
    processor = OutputProcessor(None, {7}, VOCAB)
    logits = LogitsProcessorOutput(next_token_logits=torch.randn(3, VOCAB, device="meta"))
    try:
        out = processor.sample(ScheduleBatch([ScheduledReq(r, 1, True) for r in reqs]), logits)
        assert out.next_token_ids.device.type == "meta"
    except (RuntimeError, NotImplementedError) as exc:
        assert "is not on the expected device" not in str(exc)
        assert "meta tensor" in str(exc) or "meta tensors" in str(exc), exc  # a value read back
    (info,) = built
    tensors = _tensors(info)
    assert tensors and all(t.device.type == "meta" for t in tensors)


# --- non-finite logits ------------------------------------------------------------------------
# Validation keeps user parameters in float32's range; these build the tables directly, past it,
# as the server did before: the sampler must still return a token of the vocabulary.


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1e-300),  # rounds to 0: x / 0 = inf, 0 / 0 = NaN
        SamplingParams(logit_bias={"1": 1e300, "2": 1e300}),  # inf on two tokens
        SamplingParams(logit_bias={"1": float("nan")}),
        SamplingParams(temperature=0.7, top_p=0.9, logit_bias={"3": float("inf")}),
        SamplingParams(temperature=0.0, repetition_penalty=1e-300),
    ],
)
def test_non_finite_processed_logits_still_give_a_token(params: SamplingParams) -> None:
    logits = random_logits(4)
    logits[:, 0] = 0.0  # a seen token at logit 0 becomes 0 / 0 under a zero penalty
    info = make_info([params] * 4, input_ids=[[0, 1, 2, 5]] * 4, seeds=[1, 2, 3, 4])
    processed = process_logits(logits, info)
    assert not processed.isnan().any() and not (processed == float("inf")).any()
    out = Sampler()(logits, info, return_logprob=True, top_logprobs_nums=[2] * 4)
    assert ((out.next_token_ids >= 0) & (out.next_token_ids < VOCAB)).all()
    assert torch.isfinite(out.next_token_logprobs).all()


def test_plus_inf_keeps_only_the_inf_tokens_and_all_minus_inf_falls_back_to_raw_argmax() -> None:
    logits = random_logits(2)
    info = make_info(
        [SamplingParams(logit_bias={"1": float("inf"), "2": float("inf")}), SamplingParams(temperature=0.0)],
        banned=[None, list(range(VOCAB))],  # every token of row 1 banned
        seeds=[7, 8],
    )
    processed = process_logits(logits, info)
    assert torch.isfinite(processed[0, [1, 2]]).all()
    assert (processed[0, [0] + list(range(3, VOCAB))] == float("-inf")).all()
    tokens = Sampler()(logits, info).next_token_ids.tolist()
    assert tokens[0] in (1, 2)
    assert tokens[1] == int(logits[1].argmax())


def test_inverse_cdf_keeps_nan_rows_in_range() -> None:
    probs = torch.full((2, 4), float("nan"))
    cumulative = probs.cumsum(dim=-1)
    uniforms = torch.tensor([0.0, 0.99])
    pos = inverse_cdf(probs, cumulative, None, uniforms)
    assert ((pos >= 0) & (pos < 4)).all()
    pos = inverse_cdf(probs, cumulative, torch.tensor([2, 3]), uniforms)
    assert ((pos >= 0) & (pos < 4)).all()


def test_nan_model_logits_still_give_a_token_of_the_vocabulary() -> None:
    logits = torch.full((3, VOCAB), float("nan"))
    params = [SamplingParams(), SamplingParams(top_p=0.5), SamplingParams(temperature=0.0)]
    tokens = sample(logits, params)
    assert ((tokens >= 0) & (tokens < VOCAB)).all()
