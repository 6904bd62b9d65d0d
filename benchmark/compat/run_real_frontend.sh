#!/usr/bin/env bash
# SGLang's own frontend (sglang==0.5.5 from PyPI) against our server, as a new user would run it:
# builds the frontend's venv (real_frontend_venv.py), starts OUR server
# (.venv/bin/python -m sglang.launch_server), runs real_frontend.py in that venv, stops the server.
#
#   bash benchmark/compat/run_real_frontend.sh                      # the default model (embedded SmolLM2)
#   bash benchmark/compat/run_real_frontend.sh --model-path DIR     # any other launch_server arguments
#
# Environment:
#   REAL_SGLANG_VENV   the frontend's venv (default /tmp/real-sglang-0.5.5; reused when complete)
#   REAL_SGLANG_WHEEL  a local sglang-0.5.5 wheel instead of PyPI's
#   PORT               our server's port (default 30917)
#   API_KEY            started with --api-key and sent by the frontend
#   CHECK_ARGS         extra arguments to real_frontend.py (e.g. "--allow-cut" for a random model)
# Exit status: real_frontend.py's (1 when a check failed), or 1 when the server did not start.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OURS="$ROOT/.venv/bin/python"
VENV="${REAL_SGLANG_VENV:-/tmp/real-sglang-0.5.5}"
PORT="${PORT:-30917}"
URL="http://127.0.0.1:$PORT"

build=("$OURS" "$ROOT/benchmark/compat/real_frontend_venv.py" "$VENV")
[ -n "${REAL_SGLANG_WHEEL:-}" ] && build+=(--wheel "$REAL_SGLANG_WHEEL")
echo "[compat] the real frontend's venv: $VENV"
REAL_PY="$("${build[@]}" | tail -n 1)"

server_args=(--port "$PORT" --log-level warning "$@")
key_args=()
if [ -n "${API_KEY:-}" ]; then
  server_args+=(--api-key "$API_KEY")
  key_args=(--api-key "$API_KEY")
fi
LOG="$(mktemp -t our-server.XXXXXX.log)"
echo "[compat] our server: $OURS -m sglang.launch_server ${server_args[*]} (log: $LOG)"
"$OURS" -m sglang.launch_server "${server_args[@]}" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

healthy() {
  "$OURS" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$URL" 2>/dev/null
}
for _ in $(seq 1 300); do
  healthy && break
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "[compat] our server exited:"; cat "$LOG"; exit 1
  fi
  sleep 1
done
healthy || { echo "[compat] our server is not healthy after 300 s:"; tail -n 50 "$LOG"; exit 1; }

# -I: isolated from PYTHONPATH, which could point at our own `sglang`
# shellcheck disable=SC2086  # CHECK_ARGS is a list of words
"$REAL_PY" -I "$ROOT/benchmark/compat/real_frontend.py" --url "$URL" "${key_args[@]}" ${CHECK_ARGS:-}
