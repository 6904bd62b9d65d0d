"""How backend processes are wired, without starting them: socket addresses for one node and
for several, and the environment set for the ranks only."""

import os

from sglang.srt.entrypoints.subprocesses import _environment, socket_addresses
from sglang.srt.server_args import ServerArgs


def test_one_node_uses_ipc_files():
    ipc = socket_addresses(ServerArgs(device="cpu", tknp_size=2).resolve(), "/tmp/x")
    assert ipc["rank1"] == "ipc:///tmp/x/rank1" and ipc["detokenizer"] == "ipc:///tmp/x/detokenizer"
    assert ipc["dist_init"] == "file:///tmp/x/dist_init"
    assert ipc["shm_prefix"] == "x"  # shared-memory segments are named after the socket directory


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


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_socket_dirs_of_dead_owners_are_removed(tmp_path):
    from sglang.srt.entrypoints.subprocesses import _process_start_time, remove_stale_socket_dirs

    me = os.getpid()
    dead = tmp_path / f"sglang-tknp-{_dead_pid()}-0-abc"
    reused = tmp_path / f"sglang-tknp-{me}-{_process_start_time(me) + 1}-abc"  # an earlier process with my pid
    alive = tmp_path / f"sglang-tknp-{me}-{_process_start_time(me)}-abc"
    unnamed = tmp_path / "sglang-tknp-abc123"  # no owner recorded: left alone
    other = tmp_path / "something-else-1-0-x"
    for d in (dead, reused, alive, unnamed, other):
        d.mkdir()
        (d / "scheduler").write_text("")
    # shared-memory segments (files in /dev/shm) are named after the socket directory
    dead_segment = tmp_path / f"{dead.name}-tknp0"
    alive_segment = tmp_path / f"{alive.name}-tp0"
    for f in (dead_segment, alive_segment):
        f.write_bytes(b"\0" * 64)
    removed = remove_stale_socket_dirs(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(reused), str(dead_segment)])
    assert not dead.exists() and not reused.exists() and not dead_segment.exists()
    assert alive.exists() and unnamed.exists() and other.exists() and alive_segment.exists()


def test_socket_dir_names_its_owner(tmp_path, monkeypatch):
    import tempfile

    from sglang.srt.entrypoints.subprocesses import make_socket_dir, remove_stale_socket_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = make_socket_dir()
    assert os.path.basename(path).startswith(f"sglang-tknp-{os.getpid()}-")
    assert remove_stale_socket_dirs() == [] and os.path.isdir(path)  # its owner is alive
