"""Runtime: start a local server (`python -m sglang.launch_server`) for a program, and stop it.

The server runs as a child process with its own process group, so `shutdown()` (also run
at interpreter exit) stops it and the scheduler processes it started. Its log goes to a
temporary file whose tail is part of the error when it fails to start.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from sglang.lang import http_client
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

_LOG_TAIL_CHARS = 4000


class Runtime:
    """`sgl.Runtime(model_path=..., **server_args)`: keyword arguments are launch_server flags
    (`tknp_size=2` -> `--tknp-size 2`; `True` -> a bare flag). The port is the first free one
    from `port` (default 30000) on."""

    def __init__(self, log_level: str = "error", launch_timeout: float = 300.0, **server_args: Any):
        host = server_args.pop("host", "127.0.0.1")
        port = _free_port(host, int(server_args.pop("port", 30000)))
        self.url = f"http://{host}:{port}"
        self.generate_url = self.url + "/generate"
        self.endpoint: Optional[RuntimeEndpoint] = None
        self._api_key = server_args.get("api_key")
        self._log = tempfile.NamedTemporaryFile(prefix="sglang-runtime-", suffix=".log", delete=False)
        cmd = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            log_level,
        ]
        cmd += _flags(server_args)
        self._proc: Optional[subprocess.Popen] = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = self._proc.pid
        atexit.register(self.shutdown)
        try:
            self._wait_ready(launch_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=self._api_key)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, launch_timeout: float) -> None:
        deadline = time.monotonic() + launch_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self._proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                timeout = max(1.0, min(30.0, deadline - time.monotonic()))
                http_client.request(self.url + "/health_generate", api_key=self._api_key, timeout=timeout)
                return
            except http_client.ServerError:
                time.sleep(0.5)
        raise TimeoutError(f"the server at {self.url} was not ready within {launch_timeout:g} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(self._log.name, errors="replace") as f:
                return f.read()[-_LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def shutdown(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL to its process group after 30 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.shutdown)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)  # any scheduler process left behind
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def flush_cache(self) -> bool:
        return self.endpoint.flush_cache()

    def get_server_info(self) -> dict:
        return self.endpoint.get_server_info()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _flags(server_args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in server_args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _free_port(host: str, start: int) -> int:
    for port in range(start, min(start + 1000, 65536)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} from {start}")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
