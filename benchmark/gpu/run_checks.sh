#!/usr/bin/env bash
# The CUDA path's checks for a GPU session, in one call on the device machine (prepare with
# benchmark/gpu/fetch.sh here first):
#   run(command="bash benchmark/gpu/run_checks.sh", carry=[".gpu"], timeout_s=570)
# 1. env: torch, CUDA, the GPU, flashinfer imported;
# 2. parity: flashinfer_parity.py, random weights in SmolLM2-135M's and Llama-3.2-1B's shapes,
#    page sizes 1 and 16: flashinfer and torch_native in bf16 each against torch_native in
#    float32, and CUDA graphs vs flashinfer eager;
# 3. graphs: bench_decode_graphs.py, Llama-3.2-1B's shape, decode tokens/s at batch 1/32/128
#    with and without CUDA graphs;
# 4. sampling: sampling_check.py, the sampler on CUDA logits against the CPU's (sampled,
#    top-k/p, min-p, penalised, biased, banned and seeded rows, with logprobs).
# Not here: TKNP or TP over NCCL, which need a GPU per rank (NCCL refuses two ranks on one GPU)
# and the device machine has one. Logs and JSON go to $OUT (./gpu-out when unset). Each check
# has its own time limit, so a hang leaves time for the next; the limits add up to 545 s. Exit 0
# when every check passed. FlashInfer builds its kernels with nvcc at first use: on the H200
# machine (16 cores) the bf16 head-dim-64 prefill and decode kernels took about 120 s
# (2026-12-04), which the parity check pays; the graphs check then finds them in the cache.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/python" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export BENCH_TOKENIZER_DIR="$PWD/.gpu/tokenizer"
export MAX_JOBS="$(nproc)"  # flashinfer builds its kernels with nvcc on first use

status=0
check() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

check env 20 python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'flashinfer', flashinfer.__version__)"
check parity 300 python3 benchmark/flashinfer_parity.py --models smollm2-135m,llama-3.2-1b --page-sizes 1,16 --steps 64 --out "$OUT/parity.json"
check graphs 180 python3 benchmark/bench_decode_graphs.py --shape llama-3.2-1b --batch-sizes 1,32,128 --out "$OUT/graphs.json"
check sampling 45 python3 benchmark/gpu/sampling_check.py --device cuda --out "$OUT/sampling.json"
exit $status
