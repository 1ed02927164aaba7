#!/usr/bin/env bash
# Installs what autoif.sandbox's secure mode (isolation=bwrap_seccomp) needs:
#   Debian `bubblewrap` (the bwrap binary) and `libseccomp2`; PyPI `pyseccomp`.
# Idempotent and fast when everything is present: safe to call before every test run.
#   PYTHON=/path/to/python infra/install_sandbox_deps.sh   (default: .venv/bin/python, else python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then need_apt+=(libseccomp2); fi

if ((${#need_apt[@]})); then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # update the package lists only when the install fails without it
    if ! apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null 2>&1; then
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
  else
    echo "install_sandbox_deps: missing ${need_apt[*]} (needs root + apt-get; install them for the secure sandbox mode)" >&2
  fi
fi

if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("pyseccomp") is None)' 2>/dev/null; then
  constraints=()
  [[ -f "$here/constraints.txt" ]] && constraints=(-c "$here/constraints.txt")
  "$PYTHON" -m pip install -q "${constraints[@]}" pyseccomp
fi

command -v bwrap >/dev/null 2>&1 && echo "install_sandbox_deps: ok ($(bwrap --version 2>/dev/null | head -1), pyseccomp present)"
