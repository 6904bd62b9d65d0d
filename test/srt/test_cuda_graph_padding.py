"""Padding decode batches to a CUDA graph's batch size (cuda_graph_runner.pad_decode_batch), run
eagerly on CPU: the real requests' logits, greedy tokens and KV must be what the unpadded batch
gives, on one rank and under TKNP with every partition padded to the largest one's bucket (the
layout graphs need under TKNP). No graph is captured here: that needs CUDA."""


import pytest
import torch

from conftest import run_ranks
from test_tknp_forward import PROMPTS, _run_requests, _runner

from sglang.srt.model_executor.cuda_graph_runner import bucket_for, capture_batch_sizes, pad_decode_batch
from sglang.srt.model_executor.forward_batch import ForwardMode

MAX_BS = 8  # _runner's max_running_requests


def padding_forward(inner, runner, size_for):
    """`inner` (a forward) with every decode batch padded to `size_for(batch_size)` requests."""

    def forward(batch):
        if batch is not None and batch.forward_mode == ForwardMode.DECODE:
            batch = pad_decode_batch(batch, size_for(batch.batch_size), runner.req_to_token_pool.padding_row)
        return inner(batch)

    return forward


def used_kv(runner) -> list[torch.Tensor]:
    """K and V of every handed-out slot (page size 1), per layer; free slots hold garbage."""
    slots = runner.allocator.used_pages()
    pool = runner.kv_pool
    return [buf[slots] for buf in pool.k_buffer + pool.v_buffer]


def assert_same_results(got, expected):
    assert sorted(got) == sorted(expected)
    for i, (ids, logits) in expected.items():
        assert got[i][0] == ids, f"prompt {i}"
        torch.testing.assert_close(torch.as_tensor(got[i][1]), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bs", [1, 3, 5])
def test_padding_keeps_real_rows(make_tiny_model, bs):
    model_path = str(make_tiny_model("llama", seed=4))
    prompts = range(bs)
    plain = _runner(model_path, True)
    expected = _run_requests(plain.forward, plain, PROMPTS, prompts)
    assert not plain.kv_pool.k_buffer[0][0].any(), "nothing writes the padding slot without padding"

    buckets = capture_batch_sizes(MAX_BS)
    # to the bucket, as a graph replay pads; and to the largest size (bs 1's bucket is itself)
    for size_for in (lambda n: bucket_for(n, buckets), lambda n: MAX_BS):
        padded = _runner(model_path, True)
        got = _run_requests(padding_forward(padded.forward, padded, size_for), padded, PROMPTS, prompts)
        assert_same_results(got, expected)
        assert torch.equal(padded.allocator.used_pages(), plain.allocator.used_pages())
        # matmuls over more rows may round differently: equal up to float32 noise
        for mine, ref in zip(used_kv(padded), used_kv(plain)):
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        if size_for(bs) > bs:
            assert padded.kv_pool.k_buffer[0][0].any(), "the padding rows ran, writing only slot 0"


def _tknp_rank_main(rank, tknp, init_file, model_path):
    from sglang.srt.distributed.parallel_state import RankLayout, destroy_distributed, init_distributed
    from sglang.srt.layers.tknp_attention import TknpComm
    from sglang.srt.model_executor.tknp_runner import TknpModelRunner

    torch.set_num_threads(1)
    state = init_distributed(RankLayout(tknp_size=tknp), rank, f"file://{init_file}", "gloo")
    runner = _runner(model_path, hold_weights=rank == 0)
    tknp_forward = TknpModelRunner(runner, TknpComm.of(state)).forward
    mine = [i for i in range(len(PROMPTS)) if (i + 1) % tknp == rank]
    # every rank pads its decode partition to the bucket of the largest partition, so the
    # root's global batch is tknp * bucket rows in equal, fixed splits
    largest = max(sum(1 for i in range(len(PROMPTS)) if (i + 1) % tknp == r) for r in range(tknp))
    common = bucket_for(largest, capture_batch_sizes(MAX_BS))
    assert common > len(mine), "every partition gets padding rows"
    results = _run_requests(padding_forward(tknp_forward, runner, lambda n: common), runner, PROMPTS, mine)
    destroy_distributed()
    return {i: (ids, logits.tolist()) for i, (ids, logits) in results.items()}


def test_tknp_partitions_padded_to_a_common_bucket(make_tiny_model, tmp_path):
    model_path = str(make_tiny_model("llama", seed=4))
    ref = _runner(model_path, True)
    expected = _run_requests(ref.forward, ref, PROMPTS, range(len(PROMPTS)))
    tknp = 2
    merged = {}
    for results in run_ranks(_tknp_rank_main, tknp, tknp, str(tmp_path / "init"), model_path).values():
        merged.update(results)
    assert_same_results(merged, expected)
