"""TKNP placement decisions and load merging (no processes: the policy is a plain object)."""

import pytest
from sglang.srt.managers.io_struct import GetLoadReqOutput, TokenizedGenerateReqInput
from sglang.srt.managers.tknp_controller import ApproxPrefixTree, PlacementPolicy, merge_loads
from sglang.srt.sampling.sampling_params import SamplingParams


def req(ids, max_new=16):
    return TokenizedGenerateReqInput(
        rid="r", input_ids=list(ids), sampling_params=SamplingParams(max_new_tokens=max_new), seed=0
    )


def load(rank, used, pending=0, received=0, capacity=1000):
    return GetLoadReqOutput(
        num_running_reqs=0,
        num_waiting_reqs=0,
        max_total_num_tokens=capacity,
        kv_tokens_free=capacity - used,
        kv_tokens_cached=0,
        kv_tokens_used=used,
        kv_tokens_pending=pending,
        num_received_reqs=received,
        max_running_requests=8,
        num_retractions=0,
        cache_hit_tokens=0,
        prompt_tokens=0,
        generation_tokens=0,
        tknp_rank=rank,
    )


def test_approx_tree_matches_longest_placed_prefix():
    tree = ApproxPrefixTree()
    tree.insert([1, 2, 3, 4])
    tree.insert([1, 2, 9])
    assert tree.match([1, 2, 3, 7]) == 3
    assert tree.match([1, 2, 9, 9]) == 3
    assert tree.match([5]) == 0


def test_round_robin_cycles():
    policy = PlacementPolicy("round_robin", [100, 100, 100])
    assert [policy.place(req([i])) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_shortest_queue_weighs_load_by_capacity():
    policy = PlacementPolicy("shortest_queue", [1000, 4000])
    policy.update(load(0, 100, capacity=1000))  # 10% used
    policy.update(load(1, 800, capacity=4000))  # 20% used
    assert policy.place(req([1] * 10)) == 0
    # the placed request's tokens count until the next report: 100 + 10 + 16 + 500 more
    assert policy.place(req([2] * 500)) == 0  # rank 0 at 12.6% still lighter than 20%
    assert policy.place(req([3] * 10)) == 1  # now rank 0 is at 62.6%


def test_a_report_forgets_only_the_requests_it_counted():
    policy = PlacementPolicy("shortest_queue", [1000, 1000])
    assert [policy.place(req([i] * 84)) for i in range(4)] == [0, 1, 0, 1]  # 100 tokens each
    # rank 0 has received its first request only, and queued it; the second is still in the socket
    policy.update(load(0, 0, pending=100, received=1))
    assert policy.ranks[0].load() == pytest.approx(0.2)
    # both received: one admitted (84 prompt tokens in use, 16 to generate), one queued
    policy.update(load(0, 84, pending=16 + 100, received=2))
    assert policy.ranks[0].load() == pytest.approx(0.2)
    assert policy.place(req([5] * 84)) == 0, "ties go to the lower rank"
    assert policy.place(req([6] * 84)) == 1


def test_cache_aware_prefers_the_matching_rank_until_it_is_overloaded():
    policy = PlacementPolicy("cache_aware", [1000, 1000])
    prefix = list(range(100, 400))
    first = policy.place(req(prefix + [1]))
    follow = [policy.place(req(prefix + [i])) for i in range(2, 6)]
    assert follow == [first] * 4, "a long shared prefix keeps requests on one rank"
    other = policy.place(req([7, 8, 9]))
    assert other != first, "an unrelated request goes to the least-loaded rank"
    policy.update(load(first, 900))  # the matching rank is now far busier than the other
    assert policy.place(req(prefix + [99])) != first


def test_cache_aware_ignores_short_matches():
    policy = PlacementPolicy("cache_aware", [1000, 1000])
    policy.update(load(0, 0))
    policy.update(load(1, 0))
    a = policy.place(req([1, 2, 3] + list(range(500, 600))))
    b = policy.place(req([1, 2, 3] + list(range(700, 800))))  # 3 shared tokens of 103: too short
    assert a != b


def test_merge_loads_sums_counters_and_keeps_ranks():
    merged = merge_loads([load(1, 30, capacity=500), load(0, 10, capacity=400)], [3, 4])
    assert merged.max_total_num_tokens == 900 and merged.kv_tokens_used == 40
    assert [r.tknp_rank for r in merged.ranks] == [0, 1] and merged.placements == [3, 4]


def test_merge_loads_reports_the_longest_ranks_times():
    # lockstep ranks: their forwards overlap, so the group took the slowest rank's time
    root, other = load(0, 10), load(1, 30)
    root.forward_seconds, root.tknp_comm_seconds = 4.5, 0.75
    other.forward_seconds = 2.0
    merged = merge_loads([root, other], [1, 1])
    assert merged.forward_seconds == 4.5 and merged.tknp_comm_seconds == 0.75
