"""Req.fill_slice / fill_len: the prompt + output view the scheduler reads every step, without
building the concatenated list."""

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams


def test_fill_slice_equals_slicing_fill_ids():
    req = Req("r", [5, 6, 7, 8], SamplingParams(), seed=0)
    for outputs in ([], [9], [9, 10, 11]):
        req.output_ids = list(outputs)
        fill = req.fill_ids
        assert req.fill_len == len(fill)
        for start in range(len(fill) + 1):
            for end in range(start, len(fill) + 2):
                assert req.fill_slice(start, end) == fill[start:end], (outputs, start, end)
