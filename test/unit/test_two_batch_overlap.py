"""Two-batch overlap: which decode steps split and how, and the two forwards taking turns in a fixed
order, one at a time, failing together."""

import threading

import pytest
from sglang.srt.distributed.tknp_protocol import StepHeader
from sglang.srt.model_executor.two_batch_overlap import TwoBatchOverlap, split_decode_step


def _body(name, turns, log, running):
    """Logs `name:i` for each of its `turns` stretches, handing the turn over after each; checks
    that the other body never runs at the same time."""

    def body(pass_turn):
        for i in range(turns):
            assert running.acquire(blocking=False), "both bodies ran at once"
            log.append(f"{name}{i}")
            running.release()
            pass_turn()
        return name

    return body


@pytest.mark.parametrize("turns", [(3, 3), (1, 4), (4, 1), (0, 2)])
def test_turns_alternate_and_the_longer_body_finishes_alone(turns):
    overlap = TwoBatchOverlap()
    log, running = [], threading.Lock()
    first, second = overlap.run(_body("a", turns[0], log, running), _body("b", turns[1], log, running))
    assert (first, second) == ("a", "b")
    alternating = [f"{n}{i}" for i in range(min(turns)) for n in "ab"]
    rest = [f"{'a' if turns[0] > turns[1] else 'b'}{i}" for i in range(min(turns), max(turns))]
    assert log == alternating + rest
    # the worker thread is kept: a second run goes through the same one
    assert overlap.run(lambda p: 1, lambda p: 2) == (1, 2)


@pytest.mark.parametrize("failing", [0, 1])
def test_an_exception_in_either_body_is_raised_and_ends_the_other(failing):
    overlap = TwoBatchOverlap()
    finished = []

    def body(me):
        def run(pass_turn):
            for i in range(5):
                if me == failing and i == 2:
                    raise ValueError(f"body {me} broke")
                pass_turn()
            finished.append(me)

        return run

    with pytest.raises(ValueError, match=f"body {failing} broke"):
        overlap.run(body(0), body(1))
    assert finished == [], "the other body stopped at its next turn instead of running on alone"
    assert overlap.run(lambda p: "ok", lambda p: "ok") == ("ok", "ok")


def _decode(reqs):
    return StepHeader(reqs, reqs, reqs) if reqs else StepHeader()


@pytest.mark.parametrize(
    "reqs, max_rows, firsts",
    [
        ([3, 3], None, [2, 1]),  # even micro-batches: 3 and 3
        ([1, 1], None, [1, 0]),  # one micro-batch per rank
        ([4, 0, 5], None, [2, 0, 3]),
        ([0, 5], None, [0, 2]),  # an idle root
        ([1, 0], None, None),  # the second micro-batch would be empty
        ([0, 0, 1], None, None),
        ([40, 40], 20, [20, 20]),
        ([41, 40], 20, None),  # 21 rows of rank 0 in one message: more than a send may leave unread
    ],
)
def test_decode_steps_split_each_partition_in_halves(reqs, max_rows, firsts):
    assert split_decode_step([_decode(n) for n in reqs], max_rows) == firsts


def test_only_plain_decode_steps_split():
    prefill = StepHeader(tokens=9, reqs=2, samples=2)
    scored = StepHeader(tokens=2, reqs=2, samples=2, logprobs=2)
    for other in (prefill, scored):
        assert split_decode_step([_decode(4), other], None) is None
