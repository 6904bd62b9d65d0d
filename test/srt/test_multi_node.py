"""--nnodes: two nodes on this host (two launch_server processes; node 1 runs its ranks only and
reaches node 0 over TCP) serve --tknp-size 2 with one rank on each, and give what one node with
--tknp-size 1 gives; node 1 stops on its own when node 0 shuts down."""

import concurrent.futures as cf
import random
import socket
import subprocess
import sys
import time

import pytest
import requests
from conftest import ServerProcess, assert_same_generations

pytestmark = pytest.mark.slow  # two server processes, one per node

GREEDY = {"temperature": 0, "ignore_eos": True}


def _free_port_range(n: int) -> int:
    """A port p such that p .. p + n - 1 are free now (--dist-init-addr's port and the internal
    sockets after it). Below the kernel's ephemeral range, so that no outgoing connection of this
    or another test takes one of them between this probe and the server's bind."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for _ in range(100):
        base = random.randrange(10000, max(ephemeral_low, 10000 + 2 * n) - n)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _generate_all(server, prompts):
    def one(ids):
        body = {
            "input_ids": ids,
            "sampling_params": {**GREEDY, "max_new_tokens": 12},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        return requests.post(server.url + "/generate", json=body, timeout=120).json()

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_two_nodes_serve_like_one(make_tiny_model):
    model_path = str(make_tiny_model("llama", seed=5))
    prompts = [[100 + 7 * i + j for j in range(5 + 9 * i)] for i in range(6)]
    common = ["--model-path", model_path, "--dtype", "float32", "--max-total-tokens", "2048"]
    one_node = ServerProcess(common)
    try:
        expected = _generate_all(one_node, prompts)
    finally:
        one_node.stop()

    addr = f"127.0.0.1:{_free_port_range(3 + 2)}"  # the rendezvous, detokenizer, controller_in, 2 ranks
    cluster = [
        *common,
        "--tknp-size",
        "2",
        "--nnodes",
        "2",
        "--dist-init-addr",
        addr,
        "--load-balance-method",
        "round_robin",
    ]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", *cluster, "--node-rank", "1", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        node0 = ServerProcess([*cluster, "--node-rank", "0"])
        try:
            got = _generate_all(node0, prompts)
            info = requests.get(node0.url + "/server_info").json()
        finally:
            node0.stop()
        # node 0 gone: node 1's rank loses its peers, and node 1 stops by itself
        code = node1.wait(timeout=60)
    finally:
        if node1.poll() is None:
            node1.kill()
    log = node1.stdout.read()
    assert code == 1 and "stopping node 1" in log, log

    assert info["placements"] == [3, 3], "round_robin put half the requests on node 1's rank"
    node0_rank, node1_rank = info["internal_states"]
    assert node1_rank["prompt_tokens"] > 0 and node1_rank["weight_bytes"] == 0
    assert info["max_total_num_tokens"] == 2 * 2048, "both nodes' KV pools count"
    assert_same_generations(expected, got, "prompt")


def test_losing_another_node_fails_requests_on_node_0(make_tiny_model):
    model_path = str(make_tiny_model("llama", seed=5))
    addr = f"127.0.0.1:{_free_port_range(3 + 2)}"
    cluster = [
        "--model-path",
        model_path,
        "--dtype",
        "float32",
        "--max-total-tokens",
        "2048",
        "--tknp-size",
        "2",
        "--nnodes",
        "2",
        "--dist-init-addr",
        addr,
    ]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", *cluster, "--node-rank", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node0 = None
    try:
        node0 = ServerProcess([*cluster, "--node-rank", "0"])
        node1.kill()  # its rank dies with it (PR_SET_PDEATHSIG)
        node1.wait(timeout=30)
        body = {"input_ids": [[5, 6, 7], [8, 9, 10]], "sampling_params": {**GREEDY, "max_new_tokens": 4}}
        r = requests.post(node0.url + "/generate", json=body, timeout=60)  # an error, never a hang
        results = r.json() if r.status_code == 200 else None
        assert results is None or all(x["meta_info"]["finish_reason"]["type"] == "abort" for x in results), results
        deadline = time.time() + 30
        while node0.proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert node0.proc.returncode not in (None, 0), "node 0 exits non-zero once a rank is lost"
    finally:
        if node0 is not None:
            node0.stop()
        if node1.poll() is None:
            node1.kill()
