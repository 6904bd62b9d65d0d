"""CUDA-graph settings without a GPU: capture batch sizes, bucket choice, the two flags, and
that CPU runs never build a graph runner."""

import argparse

import pytest
from sglang.srt.model_executor.cuda_graph_runner import bucket_for, capture_batch_sizes
from sglang.srt.server_args import ServerArgs


def test_capture_batch_sizes():
    assert capture_batch_sizes(160) == [1, 2, 4, 8] + list(range(16, 161, 8))
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(1) == [1]
    big = capture_batch_sizes(300)
    assert big[-5:] == [248, 256, 272, 288, 300], "every 8 up to 256, then every 16, then max_bs"
    assert big == sorted(set(big))


def test_bucket_for():
    buckets = capture_batch_sizes(32)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 8, 8, 16, 16, 24, 32]
    assert bucket_for(33, buckets) is None


def parse(*argv: str) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(list(argv)))


def test_flags():
    args = parse("--device", "cpu").resolve()
    assert args.cuda_graph_max_bs == 160 and args.disable_cuda_graph is False
    args = parse("--device", "cpu", "--cuda-graph-max-bs", "32", "--disable-cuda-graph").resolve()
    assert args.cuda_graph_max_bs == 32 and args.disable_cuda_graph is True
    # the offline Engine's keywords go through the same dataclass
    args = ServerArgs.from_kwargs(device="cpu", cuda_graph_max_bs=8, disable_cuda_graph=True).resolve()
    assert (args.cuda_graph_max_bs, args.disable_cuda_graph) == (8, True)
    with pytest.raises(ValueError, match=r"^--cuda-graph-max-bs must be >= 1, got 0$"):
        ServerArgs(device="cpu", cuda_graph_max_bs=0).resolve()


def test_cpu_runner_runs_eagerly(make_tiny_model):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    cfg = ModelConfig.from_path(str(make_tiny_model("llama")), dtype="float32")
    runner = ModelRunner(
        cfg, "cpu", "torch_native", 0.5, max_total_tokens=64, max_running_requests=4, cuda_graph_max_bs=4
    )
    assert runner.cuda_graph_runner is None
    assert runner.req_to_token_pool.padding_row == 4
    assert not runner.req_to_token_pool.req_to_token[4].any()
