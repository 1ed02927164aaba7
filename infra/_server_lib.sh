# Shared lifecycle of the loopback model servers (sourced by llamacpp_server.sh and vllm_server.sh).
# The sourcing script sets NAME HOST PORT PIDFILE LOG TIMEOUT POLL and defines do_install, do_model and
# launch (starts the server in the background under setsid, writing to $LOG), then calls server_main "$@".

log() { echo "[$NAME] $*" >&2; }
healthy() { curl -fsS -m 5 "http://$HOST:$PORT/v1/models" >/dev/null 2>&1; }
alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

do_stop() {
  [[ -f "$PIDFILE" ]] || { log "not running"; return 0; }
  local pid; pid="$(cat "$PIDFILE")"
  if kill -0 "$pid" 2>/dev/null; then
    # setsid gave the server its own process group: stop takes its children (engine cores) too
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  log "stopped"
}

do_start() {
  if alive && healthy; then echo "http://$HOST:$PORT/v1"; return 0; fi
  alive && do_stop
  if healthy; then log "port $PORT already serves something not started by this script"; exit 1; fi
  do_install >/dev/null
  launch
  echo $! >"$PIDFILE"
  local start; start=$(date +%s)
  until healthy; do
    if ! alive; then
      log "server exited during startup; last log lines:"; tail -n 40 "$LOG" >&2
      rm -f "$PIDFILE"; exit 1
    fi
    if (( $(date +%s) - start > TIMEOUT )); then
      log "not healthy after ${TIMEOUT}s; last log lines:"; tail -n 40 "$LOG" >&2
      do_stop; exit 1
    fi
    sleep "$POLL"
  done
  log "healthy after $(( $(date +%s) - start )) s"
  echo "http://$HOST:$PORT/v1"
}

server_main() {
  case "${1:-}" in
    install) do_install ;;
    model) do_model ;;
    start) do_start ;;
    stop) do_stop ;;
    status)
      if alive && healthy; then echo "http://$HOST:$PORT/v1"; else echo "not running" >&2; exit 1; fi ;;
    *) echo "usage: $0 {install|model|start|stop|status}" >&2; exit 2 ;;
  esac
}
