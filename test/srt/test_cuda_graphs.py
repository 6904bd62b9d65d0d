"""CUDA-graph decode on CPU, everything but CUDA's capture: padding decode batches to a bucket
keeps the real requests' logits, tokens and KV; and the graph runners (one rank, TP, TKNP, both)
replayed through EagerGraphs, with FlashInferAttnBackend over the stand-in flashinfer module
(re-planning into the graph wrappers' fixed buffers), give what eager forwards give."""

import pytest
import torch
from conftest import run_ranks
from sglang.srt.model_executor.cuda_graph_runner import bucket_for, capture_batch_sizes, pad_decode_batch
from sglang.srt.model_executor.forward_batch import ForwardMode
from test_tknp_forward import DECODE_STEPS, PROMPTS, _run_requests, _runner

pytestmark = pytest.mark.slow  # runners on a tiny model, and ranks as processes

MAX_BS = 8  # _runner's max_running_requests
FLASHINFER_BF16 = dict(dtype="bfloat16", attention_backend="flashinfer")
# Padding changes how many rows the matmuls see, which may round differently; a 16-bit KV value
# rounded the other way then moves the logits by a few 1e-4.
LOGITS_ATOL = 2e-3


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


def assert_same_results(got, expected, atol=1e-5):
    assert sorted(got) == sorted(expected)
    for i, (ids, logits) in expected.items():
        assert got[i][0] == ids, f"prompt {i}"
        torch.testing.assert_close(torch.as_tensor(got[i][1]), logits, atol=atol, rtol=1e-5)


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


@pytest.mark.parametrize("page_size", [1, 16])
def test_graph_replay_matches_eager(make_tiny_model, fake_flashinfer, page_size):
    from eager_graphs import EagerGraphs

    model_path = str(make_tiny_model("llama", seed=4))
    eager = _runner(model_path, True, page_size=page_size, **FLASHINFER_BF16)
    expected = _run_requests(eager.forward, eager, PROMPTS, range(len(PROMPTS)))
    graphs = EagerGraphs()
    runner = _runner(model_path, True, page_size=page_size, cuda_graph_max_bs=MAX_BS, graphs=graphs, **FLASHINFER_BF16)
    graph_runner = runner.cuda_graph_runner
    assert graph_runner.buckets == [1, 2, 4, 8] and graphs.num_captures == 4
    got = _run_requests(runner.forward, runner, PROMPTS, range(len(PROMPTS)))
    assert graph_runner.num_replays == DECODE_STEPS, "every decode step replays (5 requests, bucket 8)"
    assert_same_results(got, expected, atol=LOGITS_ATOL)
    wrapper = runner.attn_backend._graph_wrappers[8]
    assert wrapper.num_plans == 1 + DECODE_STEPS, "planned by the capture, then before every replay"
    assert runner.attn_backend._decode_wrapper.num_plans == 0, "no eager decode ran"
    assert torch.equal(runner.allocator.used_pages(), eager.allocator.used_pages())


def _graph_rank_main(rank, tknp, tp, assignment, page_size, init_file, model_path):
    """This rank's results run eagerly, then with graphs, and the graphs' replay count."""
    from eager_graphs import EagerGraphs
    from sglang.srt.distributed.parallel_state import RankLayout, destroy_distributed, init_distributed
    from sglang.srt.distributed.tknp_comm import TknpComm
    from sglang.srt.layers.tensor_parallel import TpGroup
    from sglang.srt.model_executor.tknp_runner import TknpModelRunner

    torch.set_num_threads(1)
    state = init_distributed(RankLayout(tknp_size=tknp, tp_size=tp), rank, f"file://{init_file}", "gloo")
    args = dict(tp=TpGroup.of(state), page_size=page_size, **FLASHINFER_BF16)
    results = []
    for graphs in (None, EagerGraphs()):
        graph_args = dict(cuda_graph_max_bs=MAX_BS if graphs else None, graphs=graphs)
        if tknp == 1:
            runner = _runner(model_path, True, **graph_args, **args)
            forward, graph_runner = runner.forward, runner.cuda_graph_runner
        else:
            runner = _runner(model_path, state.coords.tknp == 0, **args)
            # all_to_all, as on NCCL: the collective a graph can hold with fixed split sizes
            tknp_runner = TknpModelRunner(runner, TknpComm.of(state, use_all_to_all=True), **graph_args)
            forward, graph_runner = tknp_runner.forward, tknp_runner.graph_runner
        assert (graph_runner is not None) == (graphs is not None)
        got = _run_requests(forward, runner, PROMPTS, assignment[state.coords.tknp])
        results.append({i: (ids, logits.tolist()) for i, (ids, logits) in got.items()})
    destroy_distributed()
    assert graph_runner.buckets == [1, 2, 4, 8] and graphs.num_captures == 4
    return graph_runner.num_replays, results


@pytest.mark.parametrize(
    "tknp,tp,assignment,page_size",
    [
        (2, 1, [[0, 2, 4], [1, 3]], 1),
        (3, 1, [[0, 1, 3], [2, 4], []], 1),
        (3, 1, [[], [0, 1, 2, 3], [4]], 16),
        (1, 2, [[0, 1, 2, 3, 4]], 1),
        (2, 2, [[0, 2, 4], [1, 3]], 1),
    ],
    ids=["tknp2", "tknp3-idle-rank", "tknp3-idle-root-page16", "tp2", "tknp2xtp2"],
)
def test_graphs_across_ranks_match_eager(make_tiny_model, tmp_path, fake_flashinfer, tknp, tp, assignment, page_size):
    """Decode steps replay graphs (every rank, idle partitions included), prefill steps run
    eagerly, and every request gets what the same ranks give eagerly. Under TKNP each partition
    pads to the bucket of the largest and the scatter/gather inside the graphs has fixed
    splits; under TP the all-reduces run inside them. (TP's own rounding, which in 16-bit can
    flip a greedy token against one rank, is the same eager and replayed.)"""
    model_path = str(make_tiny_model("llama", seed=4))
    got = run_ranks(_graph_rank_main, tknp * tp, tknp, tp, assignment, page_size, str(tmp_path / "init"), model_path)
    assert {rank: replays for rank, (replays, _) in got.items()} == {rank: DECODE_STEPS for rank in got}
    eager, graphed = {}, {}
    for _, (mine_eager, mine_graphed) in got.values():
        eager.update(mine_eager)  # TP replicas of a rank return the same requests
        graphed.update(mine_graphed)
    assert sorted(eager) == list(range(len(PROMPTS)))
    assert_same_results(
        graphed, {i: (ids, torch.tensor(logits)) for i, (ids, logits) in eager.items()}, atol=LOGITS_ATOL
    )
