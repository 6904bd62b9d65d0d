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
