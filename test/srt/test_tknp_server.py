"""Token parallelism through the real server: parity with --tknp-size 1, placement, root-only
weights, per-rank observability, idle ranks, and a dying rank."""

import concurrent.futures as cf
import math
import os
import signal
import threading
import time

import pytest
import requests
from conftest import ServerProcess, assert_same_generations
from sglang.srt.distributed.cpu_binding import numa_nodes, shared_core_spin_count

pytestmark = pytest.mark.slow  # server processes with their ranks

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(make_tiny_model):
    return str(make_tiny_model("llama", seed=5))


def _server(model_path, tknp, *extra):
    return ServerProcess(["--model-path", model_path, "--dtype", "float32", "--tknp-size", str(tknp), *extra])


def _workload():
    """18 requests: prompts of 5..25 tokens (every third one shares a 20-token prefix), 60 or 61
    new tokens each (ignore_eos: exactly that many), mixed sampling (greedy and seeded)."""
    shared = [100 + i for i in range(20)]
    reqs = []
    for i in range(18):
        if i % 3 == 0:
            ids = shared + [7 + i, 8 + i]
        else:
            ids = [200 + 11 * i + j for j in range(5 + 5 * (i % 5))]
        params = {**GREEDY, "max_new_tokens": 60 + i % 2}
        if i % 4 == 1:
            # Seeded sampling over a top-k set: a random tiny model's full distribution is nearly
            # uniform over 49k tokens, where last-bit logit differences between batch shapes
            # (matmul blocking, padded attention) can move an inverse-CDF draw to a neighbour.
            params = {
                "temperature": 0.8,
                "top_k": 20,
                "top_p": 0.95,
                "sampling_seed": 1000 + i,
                "max_new_tokens": 60 + i % 2,
                "ignore_eos": True,
            }
        reqs.append(
            {
                "input_ids": ids,
                "sampling_params": params,
                "return_logprob": True,
                "logprob_start_len": max(len(ids) - 4, 0),
            }
        )
    return reqs


# KV slots per rank and prefill tokens per step of the parity test; why they force retraction
# is checked by _check_retraction_is_forced.
PARITY_KV_POOL = 123
PARITY_CHUNK = 64


def _check_retraction_is_forced(reqs: list[dict]) -> None:
    """The arithmetic that makes every run of the parity workload retract, however fast the
    ranks step: a rank retracts once it starts two requests in one step, which it does when two
    requests reach it between two of its steps while it runs at most one request (all 18 are
    sent at once; at least 6 go to one rank at tknp 3). To escape, a rank would have to receive
    its requests one at a time, steps apart; the long outputs make it retract then too, but
    that is not counted on. A request holds its prompt and every generated token but the last."""
    from sglang.srt.managers.scheduler import _INIT_NEW_TOKEN_RATIO

    prompts = [len(r["input_ids"]) for r in reqs]
    new = [r["sampling_params"]["max_new_tokens"] for r in reqs]
    pool = PARITY_KV_POOL
    # any request fits alone, so none is aborted
    assert max(p + n - 1 for p, n in zip(prompts, new)) <= pool
    # Two requests started in one step cannot both finish: before the last decode of the shorter
    # one they hold at least 2 * min(prompts) + 2 * (min(new) - 2) slots and need 2 more. (Two
    # prompts sharing the 20-token prefix hold 24 slots between them, more than 2 * min(prompts).)
    assert 2 * min(prompts) + 2 * (min(new) - 1) > pool
    # Two requests that arrive together start together and both compute their whole prompt in
    # that step (a prompt cut by the prefill budget could wait for its rest behind the decode
    # reserve): the budget holds both prompts, and both fit even beside a request already
    # running, whose decode reserve (new_token_ratio, at most its initial value, of its
    # remaining tokens) and prompt they leave room for during its first steps.
    assert 2 * max(prompts) <= PARITY_CHUNK
    assert 3 * max(prompts) + 1 + math.ceil(_INIT_NEW_TOKEN_RATIO * max(new)) <= pool


def _run_concurrently(server, reqs):
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(requests.post, server.url + "/generate", json=r, timeout=300) for r in reqs]
        return [f.result().json() for f in futures]


def test_parity_across_tknp_and_tp_sizes_with_retraction(model_path):
    """The oracle is --tknp-size 1: TKNP 2 and 3 must match it, and TP 2 x TKNP 2 must match
    TP 2 x TKNP 1 (4 processes). TP itself changes float rounding (row-parallel sums), so
    TP 2 is held to the same tokens and logprobs within 1e-4 of TP 1. "shm+tbo": two-batch
    overlap on the decode steps."""
    _check_retraction_is_forced(_workload())
    results = {}
    # the ranks exchange data through shared memory; (2, 1, "gloo") forces gloo for comparison
    configs = (
        (1, 1, ""),
        (2, 1, "shm"),
        (2, 1, "gloo"),
        (2, 1, "shm+tbo"),
        (3, 1, "shm+tbo"),
        (1, 2, "shm"),
        (2, 2, "shm"),
    )
    for tknp, tp, transport in configs:
        # The pool and workload force retraction on every run: see _check_retraction_is_forced.
        server = _server(
            model_path,
            tknp,
            "--tp-size",
            str(tp),
            "--max-total-tokens",
            str(PARITY_KV_POOL),
            "--chunked-prefill-size",
            str(PARITY_CHUNK),
            *(["--disable-shm-transport"] if transport == "gloo" else []),
            *(["--enable-two-batch-overlap"] if transport.endswith("+tbo") else []),
        )
        try:
            results[tknp, tp, transport] = _run_concurrently(server, _workload())
            info = requests.get(server.url + "/server_info").json()
            assert info["num_retractions"] > 0, f"tknp {tknp} tp {tp}: the pool was meant to force retraction"
            assert info["kv_tokens_used"] == 0 and info["num_running_reqs"] == 0
            assert len(info["internal_states"]) == tknp, "one entry per TKNP rank (TP replicas are one rank)"
            used = transport.removesuffix("+tbo")
            if tknp == 2 and tp == 1 and len(os.sched_getaffinity(0)) >= 2 and len(numa_nodes()) == 1:
                root, rank = info["cpu_binding"]
                assert root["own_cpus"] and rank["own_cpus"] == "", "auto: the root borrows its rank's cores"
            assert set(info["transport"].values()) == ({used} if used else set()), info["transport"]
            overlapped = info["internal_states"][0]["tknp_overlapped_steps"]
            assert (overlapped > 0) == transport.endswith("+tbo"), overlapped
            states = info["internal_states"]
            if used == "shm" and tknp > 1:
                # the root's waits for the ranks' outputs are part of its exchange's time
                assert 0 < states[0]["tknp_wait_seconds"] <= states[0]["tknp_comm_seconds"], states[0]
                assert all(s["tknp_wait_seconds"] > 0 for s in states[1:]), "the ranks wait for their q/k/v"
            else:  # gloo does not tell waiting from moving, and tknp 1 exchanges nothing
                assert all(s["tknp_wait_seconds"] == 0 for s in states), states
        finally:
            server.stop()
    pairs = (
        ((2, 1, "shm"), (1, 1, "")),
        ((2, 1, "gloo"), (1, 1, "")),
        ((2, 1, "shm+tbo"), (1, 1, "")),
        ((3, 1, "shm+tbo"), (1, 1, "")),
        ((2, 2, "shm"), (1, 2, "shm")),
        ((1, 2, "shm"), (1, 1, "")),
    )
    for config, oracle in pairs:
        assert_same_generations(results[oracle], results[config], f"tknp x tp x transport {config} request")


def test_root_only_weights_capacity_and_observability(model_path):
    # overlapping lists: the root runs on both cores and attends on 1, which is its own
    two = len(os.sched_getaffinity(0)) > 1
    binding = "0-1|0" if two else "0|0"
    server = _server(
        model_path, 2, "--enable-metrics", "--load-balance-method", "round_robin", "--cpu-omp-threads-bind", binding
    )
    try:
        for i in range(4):
            requests.post(
                server.url + "/generate",
                json={"input_ids": [5 + i] * 8, "sampling_params": {**GREEDY, "max_new_tokens": 3}},
            )
        info = requests.get(server.url + "/server_info").json()
        root, other = info["internal_states"]
        assert root["weight_bytes"] > 0 and other["weight_bytes"] == 0
        assert other["max_total_num_tokens"] > root["max_total_num_tokens"], "the root pays for the weights"
        assert info["placements"] == [2, 2], "round_robin spreads evenly"
        assert root["prompt_tokens"] == other["prompt_tokens"] == 16
        metrics = requests.get(server.url + "/metrics").text
        for rank in ("0", "1"):
            assert f'tknp_rank="{rank}"' in metrics
            # the queue-time histogram counts each rank's own requests
            assert (
                f'sglang:queue_time_seconds_count{{model_name="{info["served_model_name"]}",tknp_rank="{rank}"}} 2.0'
                in metrics
            )
        assert "sglang:tknp_placements_total" in metrics and "sglang:cache_hit_rate" in metrics

        # each rank runs on the cores it was given, with one OpenMP thread per core; the root's
        # main thread (it attends and waits for the rank) on its own core
        planned = [(0, "0-1", "1"), (1, "0", "")] if two else [(0, "0", ""), (1, "0", "")]
        assert [(b["rank"], b["cpus"], b["own_cpus"]) for b in info["cpu_binding"]] == planned
        assert info["transport"] == {"tknp": "shm", "lockstep": "shm"}, "ranks on one host use shared memory"
        root_pid, rank_pid = _rank_pids(server.proc.pid)[:2]
        assert _allowed_cpus(root_pid) == ("1" if two else "0")
        assert {_allowed_cpus(root_pid, t) for t in os.listdir(f"/proc/{root_pid}/task")} == (
            {"0", "1"} if two else {"0"}
        ), "the root's dense work runs on both cores, a thread pinned to each"
        assert _allowed_cpus(rank_pid) == "0"
        root_env, rank_env = _environ(root_pid), _environ(rank_pid)
        assert "OMP_NUM_THREADS=1" in rank_env
        assert (
            ("OMP_NUM_THREADS=2" in root_env and "OMP_PLACES={1},{0}" in root_env)
            if two
            else ("OMP_NUM_THREADS=1" in root_env)
        )
    finally:
        server.stop()


def test_shortest_queue_balances_by_load(model_path):
    server = _server(model_path, 2, "--load-balance-method", "shortest_queue", "--max-total-tokens", "4096")
    try:
        reqs = [{"input_ids": [9 + i] * 200, "sampling_params": {**GREEDY, "max_new_tokens": 300}} for i in range(6)]
        _run_concurrently(server, reqs)
        assert requests.get(server.url + "/server_info").json()["placements"] == [3, 3]
    finally:
        server.stop()


def test_cache_aware_keeps_a_shared_prefix_on_one_rank(model_path):
    server = _server(model_path, 2, "--load-balance-method", "cache_aware", "--max-total-tokens", "8192")
    try:
        prefix = [300 + (i % 500) for i in range(512)]
        shared = [
            {"input_ids": prefix + [1000 + i], "sampling_params": {**GREEDY, "max_new_tokens": 4}} for i in range(8)
        ]
        first = requests.post(server.url + "/generate", json=shared[0]).json()
        assert first["meta_info"]["cached_tokens"] == 0
        rest = _run_concurrently(server, shared[1:])
        assert all(r["meta_info"]["cached_tokens"] >= 512 for r in rest)
        placements = requests.get(server.url + "/server_info").json()["placements"]
        assert sorted(placements) == [0, 8], "all 8 sharing requests on one rank"
        unrelated = [
            {"input_ids": [2000 + 37 * i + j for j in range(40)], "sampling_params": {**GREEDY, "max_new_tokens": 30}}
            for i in range(6)
        ]
        _run_concurrently(server, unrelated)
        placements = requests.get(server.url + "/server_info").json()["placements"]
        assert min(placements) >= 3, f"unrelated requests spread: {placements}"
    finally:
        server.stop()


def _allowed_cpus(pid, task=None):
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    with open(path) as f:
        return next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:"))


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return [item.decode(errors="replace") for item in f.read().split(b"\0")]


def _rank_pids(server_pid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, StopIteration):
                continue
            if ppid == server_pid and b"spawn_main" in cmd:
                pids.append(int(entry))
    return sorted(pids)


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_ranks_do_not_spin_and_a_dead_rank_fails_requests(model_path):
    server = _server(model_path, 2, "--max-total-tokens", "4096")
    try:
        requests.post(server.url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 2}})
        pids = _rank_pids(server.proc.pid)
        for pid in pids[:2]:
            # OpenMP threads on cores another rank uses wait passively, or spin briefly (a root
            # that borrows its rank's cores, and the rank that lends them: the server measured
            # this CPU's pause for that, as this test does)
            env = _environ(pid)
            spins = [int(item.split("=", 1)[1]) for item in env if item.startswith("GOMP_SPINCOUNT=")]
            assert (
                "OMP_WAIT_POLICY=PASSIVE" in env
                or (spins and shared_core_spin_count() / 3 < spins[0] < shared_core_spin_count() * 3)
                or "OMP_NUM_THREADS=1" in env
            ), env
        before = {p: _cpu_seconds(p) for p in pids}
        time.sleep(2.0)
        spent = sum(_cpu_seconds(p) - before[p] for p in pids)
        assert spent < 0.5, f"idle backend processes used {spent:.2f} s of CPU in 2 s"

        result = {}

        def run():
            body = {"text": "Count", "sampling_params": {**GREEDY, "max_new_tokens": 4000}}
            result["r"] = requests.post(server.url + "/generate", json=body, timeout=60)

        t = threading.Thread(target=run)
        t.start()
        while requests.get(server.url + "/server_info").json()["num_running_reqs"] == 0:
            time.sleep(0.01)
        # the backend processes start in order: scheduler0 (root), scheduler1, detokenizer, controller
        os.kill(pids[1], signal.SIGKILL)
        start = time.time()
        statuses = set()
        while time.time() - start < 5 and 503 not in statuses:
            try:
                statuses.add(requests.get(server.url + "/health", timeout=1).status_code)
            except requests.RequestException:
                break  # already gone
            time.sleep(0.02)
        assert 503 in statuses, "/health reports the dead rank before the server exits"
        t.join(timeout=10)
        assert not t.is_alive() and time.time() - start < 10
        assert result["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert server.proc.wait(timeout=15) == 1
    finally:
        server.stop()
