"""How backend processes are wired, without starting them: socket addresses for one node and
for several, and the environment set for the ranks only."""

import os

from sglang.srt.entrypoints.subprocesses import _environment, socket_addresses
from sglang.srt.server_args import ServerArgs


def test_one_node_uses_ipc_files():
    ipc = socket_addresses(ServerArgs(device="cpu", tknp_size=2).resolve(), "/tmp/x")
    assert ipc["rank1"] == "ipc:///tmp/x/rank1" and ipc["detokenizer"] == "ipc:///tmp/x/detokenizer"
    assert ipc["dist_init"] == "file:///tmp/x/dist_init"


def test_several_nodes_reach_node_0_over_tcp():
    args = ServerArgs(
        device="cpu", tknp_size=2, tp_size=2, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000"
    ).resolve()
    assert list(args.node_ranks()) == [2, 3]
    ipc = socket_addresses(args, "/tmp/x")
    assert ipc["dist_init"] == "tcp://10.0.0.1:5000"
    shared = ["detokenizer", "controller_in", "rank0", "rank1", "rank2", "rank3"]
    assert [ipc[name] for name in shared] == [f"tcp://10.0.0.1:{5001 + i}" for i in range(6)]
    # what only node 0's own processes use stays local
    assert ipc["tokenizer"].startswith("ipc://") and ipc["scheduler"].startswith("ipc://")


def test_environment_is_set_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv("SGLANG_TEST_KEPT", "before")
    monkeypatch.delenv("SGLANG_TEST_NEW", raising=False)
    with _environment({"SGLANG_TEST_KEPT": "inside", "SGLANG_TEST_NEW": "inside"}):
        assert os.environ["SGLANG_TEST_KEPT"] == os.environ["SGLANG_TEST_NEW"] == "inside"
    assert os.environ["SGLANG_TEST_KEPT"] == "before" and "SGLANG_TEST_NEW" not in os.environ
