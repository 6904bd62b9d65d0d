"""Builds the venv that real_frontend.py runs in: SGLang's frontend from PyPI, without its server.

The real package is also named `sglang`, so it cannot share our venv. `sglang==0.5.5` goes in
with `--no-deps` (its declared dependencies are the whole server: torch, flashinfer, ...),
then only what `import sglang` and `sglang.RuntimeEndpoint` import: sglang/utils.py (numpy,
pybase64, requests, IPython, pydantic, tqdm), sglang/lang/choices.py (numpy),
sglang/lang/interpreter.py (tqdm), sglang/lang/backend/runtime_endpoint.py (aiohttp, requests).
No torch.

    python benchmark/compat/real_frontend_venv.py /tmp/real-sglang   # prints the venv's python

Run real_frontend.py with `python -I` (isolated mode), so that a PYTHONPATH pointing at our
own package cannot shadow the real one. Stdlib only, so any Python 3.9+ can run it. A venv whose marker file says it holds this exact
set is reused; anything else in that directory is replaced.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import venv
from pathlib import Path

SGLANG_VERSION = "0.5.5"
FRONTEND_DEPS = ["requests", "numpy", "tqdm", "pybase64", "pydantic", "IPython", "aiohttp"]
_MARKER = ".real-frontend"


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def build(venv_dir: Path, wheel: str | None = None) -> Path:
    """Creates (or reuses) the venv at `venv_dir` and returns its python. `wheel`: a local
    sglang wheel to install instead of downloading sglang==SGLANG_VERSION. Raises
    CalledProcessError when pip fails (e.g. PyPI unreachable): that is a failure to report,
    not a reason to skip the checks."""
    venv_dir = Path(venv_dir)
    want = f"sglang=={SGLANG_VERSION} {' '.join(FRONTEND_DEPS)}\n"
    marker = venv_dir / _MARKER
    python = venv_python(venv_dir)
    if marker.exists() and marker.read_text() == want and python.exists():
        return python
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    venv.create(venv_dir, with_pip=True)
    # -I: isolated from PYTHONPATH and the user's site-packages, which could hold our sglang
    pip = [str(python), "-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    subprocess.run([*pip, *FRONTEND_DEPS], check=True)
    subprocess.run([*pip, "--no-deps", wheel or f"sglang=={SGLANG_VERSION}"], check=True)
    version = subprocess.run(
        [str(python), "-I", "-c", "import sglang, sglang.lang.backend.runtime_endpoint; print(sglang.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if version != SGLANG_VERSION:
        raise RuntimeError(f"the venv at {venv_dir} imports sglang {version}, not {SGLANG_VERSION}")
    marker.write_text(want)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv_dir", type=Path)
    parser.add_argument("--wheel", default=None, help="a local sglang wheel instead of PyPI's")
    args = parser.parse_args()
    print(build(args.venv_dir, args.wheel))


if __name__ == "__main__":
    main()
