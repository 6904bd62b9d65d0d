"""SGLang's own frontend (sglang==0.5.5 from PyPI, in a venv of its own, since it is also named
`sglang`) against our server: every check of benchmark/compat/real_frontend.py must pass.

The server runs a tiny random Llama, so the structured-output checks run with --allow-cut (a
random model never closes a string; its output must still be the server's answer to the same
request); that complete output parses is checked on the default model, for our frontend by
test_frontend_default_model.py and for SGLang's by benchmark/compat/run_real_frontend.sh.
The venv is built from PyPI in a temporary directory while the server starts. When PyPI cannot
be reached the test fails: the real frontend is the point of it, and a skip would hide that.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServerProcess

pytestmark = pytest.mark.slow  # a server process, pip installs, a second Python

COMPAT = Path(__file__).resolve().parents[2] / "benchmark" / "compat"
API_KEY = "sk-real-frontend"


def test_real_sglang_frontend_runs_against_our_server(tmp_path, make_tiny_model):
    venv_dir = tmp_path / "real-sglang"
    builder = subprocess.Popen(
        [sys.executable, str(COMPAT / "real_frontend_venv.py"), str(venv_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = None
    try:
        model = make_tiny_model("llama", seed=3)
        args = ["--model-path", str(model), "--dtype", "float32", "--max-total-tokens", "4096", "--api-key", API_KEY]
        server = ServerProcess(args)
        built, _ = builder.communicate(timeout=300)
        assert builder.returncode == 0, f"could not install SGLang's frontend from PyPI:\n{built[-3000:]}"
        python = built.strip().splitlines()[-1]
        cmd = [
            python,
            "-I",
            str(COMPAT / "real_frontend.py"),
            "--url",
            server.url,
            "--api-key",
            API_KEY,
            "--allow-cut",
            "-v",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        report = run.stdout + run.stderr[-4000:]
        assert run.returncode == 0, report
        assert "FAIL" not in run.stdout and run.stdout.count("PASS ") >= 12, report
        assert re.search(r"^(\d+)/\1 passed$", run.stdout, re.MULTILINE), report
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
        if server is not None:
            server.stop()
