"""The engine with a paged KV cache (--page-size): same greedy tokens as page size 1 under chunked
prefill and retraction, prefix hits in whole pages, every page back after a flush."""

import pytest

pytestmark = pytest.mark.slow  # engines on a tiny model

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(make_tiny_model):
    return str(make_tiny_model("llama", seed=1))


def _checked_every_step(engine) -> None:
    """Pool integrity (pages in one place, page layout of every row) after every step."""
    sched = engine.scheduler
    step = sched.step

    def checked_step(*args, **kwargs):
        out = step(*args, **kwargs)
        sched.check_integrity()
        return out

    sched.step = checked_step


def test_page_size_16_gives_the_tokens_of_page_size_1(engine_factory, model_path):
    shared = [7 + 3 * j for j in range(40)]
    prompts = [shared + [300 + 11 * i + j for j in range(3 + 6 * i)] for i in range(6)]
    prompts += [[900 + 5 * i + j for j in range(9 + 13 * i)] for i in range(3)]
    params = {**GREEDY, "max_new_tokens": 48}
    outputs = {}
    for page_size in (1, 16):
        engine = engine_factory(
            model_path=model_path, dtype="float32", page_size=page_size, max_total_tokens=256, chunked_prefill_size=24
        )
        _checked_every_step(engine)
        allocator = engine.scheduler.kv.allocator
        free_at_start = allocator.available_size()
        outputs[page_size] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        assert engine.scheduler.num_retractions > 0, "the small pool was meant to force retraction"
        assert engine.flush_cache() and allocator.available_size() == free_at_start
    assert all(len(ids) == 48 for ids in outputs[16])
    assert outputs[16] == outputs[1]


@pytest.mark.parametrize("shared_len,cached", [(64, 64), (50, 48)])
def test_prefix_hits_are_whole_pages(engine_factory, model_path, shared_len, cached):
    engine = engine_factory(model_path=model_path, dtype="float32", page_size=16, max_total_tokens=1000)
    assert engine.scheduler.kv.total_tokens == 992  # rounded down to whole pages
    shared = list(range(10, 10 + shared_len))
    params = {**GREEDY, "max_new_tokens": 5}
    first = engine.generate(input_ids=shared + list(range(500, 510)), sampling_params=params)
    second = engine.generate(input_ids=shared + list(range(600, 607)), sampling_params=params)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == cached
    engine.scheduler.check_integrity()
