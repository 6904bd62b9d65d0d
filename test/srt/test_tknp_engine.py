"""sglang.Engine with --tknp-size 2: the same results as --tknp-size 1, through the processes."""

import pytest

pytestmark = pytest.mark.slow  # an engine whose ranks are processes


def test_engine_tknp_matches_plain_engine(engine_factory, make_tiny_model):
    from sglang import Engine

    path = str(make_tiny_model("llama", seed=6))
    prompts = [[5 + i] * (3 + 7 * i) for i in range(7)]
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    plain = engine_factory(model_path=path, dtype="float32", max_total_tokens=2048)
    expected = [o["output_ids"] for o in plain.generate(input_ids=prompts, sampling_params=params)]
    with Engine(
        model_path=path,
        dtype="float32",
        max_total_tokens=2048,
        tknp_size=2,
        load_balance_method="round_robin",
        log_level="warning",
    ) as engine:
        assert engine.scheduler is None, "no in-process scheduler: ranks run in their own processes"
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == expected
        chunks = list(engine.generate(input_ids=prompts[3], sampling_params=params, stream=True))
        assert chunks[-1]["output_ids"] == expected[3] and len(chunks) > 1
        info = engine.get_server_info()
        assert [r["tknp_rank"] for r in info["ranks"]] == [0, 1]
        assert info["placements"] == [4, 4]
        assert info["ranks"][1]["weight_bytes"] == 0
        assert engine.flush_cache()


def test_a_rank_that_dies_fails_the_engines_requests_instead_of_hanging(make_tiny_model):
    import os
    import signal
    import threading
    import time

    from sglang import Engine

    engine = Engine(
        model_path=str(make_tiny_model("llama", seed=6)),
        dtype="float32",
        max_total_tokens=8192,
        tknp_size=2,
        load_balance_method="round_robin",
        log_level="error",
    )
    try:
        victim = engine.remote.backend.procs["scheduler1"].pid
        threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        start = time.time()
        params = {"temperature": 0, "max_new_tokens": 4000, "ignore_eos": True}
        outs = engine.generate(input_ids=[[5] * 8, [6] * 8], sampling_params=params)
        assert time.time() - start < 30
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
        assert "scheduler1 process died" in outs[1]["meta_info"]["finish_reason"]["message"]
        with pytest.raises(RuntimeError, match="scheduler1 process died"):  # later requests fail at once
            engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    finally:
        engine.shutdown()


def test_bf16_tknp_root_takes_the_fused_layer_halves_and_matches_tknp_1(engine_factory, make_tiny_model):
    """In bf16 a decode layer runs as sgl_kernel calls: whole (decode_layer) at tknp 1, in two
    halves around the ranks' attention (decode_layer_qkv, decode_layer_out) on a TKNP root.
    Both are the layer-by-layer ops in the same order, so greedy tokens agree; with two-batch
    overlap too, where the halves of two micro-batches take turns."""
    from sglang import Engine

    path = str(make_tiny_model("llama", seed=6))
    prompts = [[5 + i] * (3 + 7 * i) for i in range(7)]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    plain = engine_factory(model_path=path, dtype="bfloat16", max_total_tokens=2048)
    assert all(layer.fused_decode is not None for layer in plain.scheduler.runner.model.model.layers)
    expected = [o["output_ids"] for o in plain.generate(input_ids=prompts, sampling_params=params)]
    kwargs = dict(model_path=path, dtype="bfloat16", max_total_tokens=2048, log_level="warning")
    for overlap in (False, True):
        with Engine(**kwargs, tknp_size=2, load_balance_method="round_robin", enable_two_batch_overlap=overlap) as e:
            outs = e.generate(input_ids=prompts, sampling_params=params)
            assert (e.get_server_info()["ranks"][0]["tknp_overlapped_steps"] > 0) == overlap
        assert [o["output_ids"] for o in outs] == expected, f"two-batch overlap {overlap}"


def test_bf16_tknp_x_tp_matches_tp_alone(make_tiny_model):
    """Under TP a bf16 decode layer runs as sgl_kernel calls around its all-reduces, on a TKNP
    root too (with the ranks' attention between); TKNP on top of TP 2 changes no token."""
    from sglang import Engine

    kwargs = dict(model_path=str(make_tiny_model("llama", seed=6)), dtype="bfloat16", max_total_tokens=2048)
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    outs = {}
    for tknp in (1, 2):
        with Engine(**kwargs, tknp_size=tknp, tp_size=2, load_balance_method="round_robin", log_level="warning") as e:
            outs[tknp] = [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=params)]
    assert outs[2] == outs[1]
