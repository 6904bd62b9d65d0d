"""Shared fixtures: tiny random-weight models in real architectures, the default model's tokenizer.

Tiny models reuse SmolLM2's tokenizer (extracted once from the embedded GGUF file), so prompts
are real text and vocab ids are real; their weights are random, built by transformers itself.
"""

import os

# Tests never reach a model hub; set before anything imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
from pathlib import Path

import pytest

TINY_VOCAB = 49152  # SmolLM2's tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from sglang.srt.model_loader import default_model_path, load_tokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    load_tokenizer(default_model_path()).save_pretrained(out)
    return out


def _tiny_config(arch: str, **overrides):
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        # Wider than the default 0.02 so random logits are decisive, not near-ties.
        initializer_range=0.1,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    return cls(**common)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, tokenizer_dir):
    """make_tiny_model(arch, **config_overrides) -> directory with config, safetensors, tokenizer."""
    import torch
    import transformers

    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, repr(sorted(overrides.items())))
        if key not in cache:
            config = _tiny_config(arch, **overrides)
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            model.save_pretrained(out, safe_serialization=True)
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, out / f.name)
            cache[key] = out
        return cache[key]

    return make


def assert_kv_pool_clean(engine) -> None:
    """No request holds KV, nothing leaked, and flushing returns every slot to the allocator."""
    sched = engine.scheduler
    assert not sched.waiting and not sched.running
    sched.check_integrity()
    kv = sched.kv
    assert kv.tree.protected_size() == 0
    assert kv.req_to_token_pool.available_size() == kv.req_to_token_pool.size
    assert engine.flush_cache()
    assert kv.allocator.available_size() == kv.total_tokens


@pytest.fixture
def engine_factory():
    """engine_factory(**server_args) -> Engine; after the test each engine's pool must be clean."""
    from sglang import Engine

    engines = []

    def make(**kwargs):
        kwargs.setdefault("log_level", "warning")
        engine = Engine(**kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_kv_pool_clean(engine)
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_model) -> str:
    """The tiny random Llama (seed 2) the engine tests of sampling and grammars run on."""
    return str(make_tiny_model("llama", seed=2))


@pytest.fixture
def tiny_engine(engine_factory, tiny_llama):
    """An engine on `tiny_llama` in float32 with 4096 KV tokens (its pool checked clean after)."""
    return engine_factory(model_path=tiny_llama, dtype="float32", max_total_tokens=4096)


class ServerProcess:
    """A real `python -m sglang.launch_server` child on a free local port."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0):
        import socket
        import subprocess
        import sys
        import time

        import requests

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_server(make_tiny_model):
    """A server on a tiny random Llama (float32), shared by a test module."""
    server = ServerProcess(
        ["--model-path", str(make_tiny_model("llama", seed=3)), "--dtype", "float32", "--max-total-tokens", "4096"]
    )
    yield server
    server.stop()


@pytest.fixture
def fake_flashinfer(monkeypatch):
    """`import flashinfer` gives the CPU stand-in (paged_attention_ref) for one test, and the
    FlashInfer backend is imported afresh against it (ranks forked by the test inherit both)."""
    import sys

    from paged_attention_ref import fake_flashinfer as standin

    backend_module = "sglang.srt.layers.attention.flashinfer_backend"
    monkeypatch.setitem(sys.modules, "flashinfer", standin())
    sys.modules.pop(backend_module, None)
    yield
    sys.modules.pop(backend_module, None)  # no later import may see the stand-in


def assert_same_generations(expected: list[dict], got: list[dict], what: str = "request") -> None:
    """/generate results (with return_logprob) of two servers: the same tokens, and the same
    prompt and output logprobs to 1e-4."""
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a["output_ids"] == b["output_ids"], f"{what} {i}"
        for key in ("input_token_logprobs", "output_token_logprobs"):
            for j, (x, y) in enumerate(zip(a["meta_info"][key], b["meta_info"][key])):
                where = f"{what} {i} {key}[{j}]: {x[:2]} vs {y[:2]}"
                assert x[1] == y[1] and (x[0] is None) == (y[0] is None), where
                assert x[0] is None or abs(x[0] - y[0]) <= 1e-4, where


def _rank_entry(target, rank, args, queue) -> None:
    try:
        queue.put((rank, True, target(rank, *args)))
    except BaseException as exc:
        queue.put((rank, False, repr(exc)))
        raise


def run_ranks(target, world: int, *args, timeout: float = 120.0) -> dict:
    """Runs `target(rank, *args)` in `world` forked processes (real torch.distributed ranks) and
    returns {rank: what it returned}. Return plain data: a tensor would cross the queue as a
    shared-memory handle that dies with its process."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(target, r, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world):
            rank, ok, payload = queue.get(timeout=timeout)
            assert ok, f"rank {rank} failed: {payload}"
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


def pytest_sessionfinish(session, exitstatus) -> None:
    """No shared-memory segment outlives the server that made it: one left in /dev/shm by a
    process that is gone fails the run (segments are unlinked once every rank mapped them)."""
    from sglang.srt.distributed.shm_comm import SEGMENT_DIR
    from sglang.srt.entrypoints.subprocesses import stale_socket_dirs

    left = [os.path.basename(path) for path in stale_socket_dirs(SEGMENT_DIR)]
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"shared-memory segments left in {SEGMENT_DIR} by servers that are gone: {left}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
