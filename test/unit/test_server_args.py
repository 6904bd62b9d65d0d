"""ServerArgs.resolve: the parallelism and placement rules hold, with one-line errors that name
the flag, whichever way the arguments arrive (launch_server's command line, sglang.Engine's
keywords, a ServerArgs built directly); each rule lives only in resolve."""

from __future__ import annotations

import pytest
from sglang.launch_server import parse_args
from sglang.srt.server_args import LOAD_BALANCE_METHODS, ServerArgs

BAD = [
    (dict(tknp_size=2, dp_size=2), "--tknp-size 2 and --dp-size 2 are mutually exclusive; set one of them to 1"),
    (dict(dp_size=2), "--dp-size must be 1 (data parallelism is not supported; use --tknp-size), got 2"),
    (dict(pp_size=2), "--pp-size must be 1 (pipeline parallelism is not supported), got 2"),
    (dict(tknp_size=0), "--tknp-size must be an integer >= 1, got 0"),
    (dict(tp_size=0), "--tp-size must be an integer >= 1, got 0"),
    (dict(load_balance_method="random"), "--load-balance-method must be one of round_robin, shortest_queue"),
    (
        dict(tknp_size=3, device="cpu", cpu_omp_threads_bind="0|1"),
        "--cpu-omp-threads-bind '0|1' has 2 CPU lists, but this host runs 3 ranks",
    ),
    (
        dict(tknp_size=2, device="cpu", cpu_omp_threads_bind="0|zero"),
        "--cpu-omp-threads-bind: 'zero' is not a CPU list",
    ),
    (dict(enable_two_batch_overlap=True), "--enable-two-batch-overlap needs --tknp-size > 1, got 1"),
    (
        dict(enable_two_batch_overlap=True, tknp_size=2, device="cuda"),
        "--enable-two-batch-overlap runs on CPU ranks only (GPU ranks exchange q/k/v with NCCL all_to_all), got 'cuda'",
    ),
]


def _build(entry: str, kwargs: dict) -> ServerArgs:
    if entry == "direct":
        return ServerArgs(**kwargs)
    if entry == "engine_kwargs":
        return ServerArgs.from_kwargs(**kwargs)
    flags = [("--" + name.replace("_", "-"), value) for name, value in kwargs.items()]
    return parse_args([x for flag, value in flags for x in ((flag,) if value is True else (flag, str(value)))])


@pytest.mark.parametrize("kwargs, message", BAD)
@pytest.mark.parametrize("entry", ["direct", "engine_kwargs", "cli"])
def test_bad_parallelism_is_a_one_line_error(kwargs, message, entry):
    if entry == "cli" and "load_balance_method" in kwargs:
        with pytest.raises(SystemExit):  # argparse's choices, from the same LOAD_BALANCE_METHODS
            _build(entry, kwargs)
        return
    args = _build(entry, kwargs)
    with pytest.raises(ValueError) as info:
        args.resolve()
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", LOAD_BALANCE_METHODS)
def test_every_load_balance_method_and_size_one_pp_resolve(method):
    args = parse_args(["--load-balance-method", method, "--pp-size", "1", "--device", "cpu"]).resolve()
    assert args.load_balance_method == method and args.pp_size == 1


def test_cpu_binding_defaults():
    import os

    lone = ServerArgs(device="cpu").resolve()
    assert [b.cpus for b in lone.cpu_bindings()] == [()]  # one rank: every core, as before
    from sglang.srt.distributed.cpu_binding import numa_nodes

    tknp = ServerArgs(device="cpu", tknp_size=2).resolve()
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if len(numa_nodes()) == 1 and len(allowed) >= 2:
        # on one NUMA node the root borrows its rank's cores (see ServerArgs.cpu_bindings)
        root, rank = tknp.cpu_bindings()
        assert root.cpus == allowed and rank.cpus and rank.own == ()
        assert root.own == tuple(c for c in allowed if c not in rank.cpus)
    if len(os.sched_getaffinity(0)) >= 2:
        tp = ServerArgs(device="cpu", tp_size=2).resolve()
        cores = [b.cpus for b in tp.cpu_bindings()]
        assert all(cores) and not set(cores[0]) & set(cores[1]), "TP ranks split the cores"
        assert [
            b.cpus for b in ServerArgs(device="cpu", tp_size=2, cpu_omp_threads_bind="all").resolve().cpu_bindings()
        ] == [(), ()]
