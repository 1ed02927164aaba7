#!/usr/bin/env bash
# Build llama-cpp-python from PyPI source into a wheel cache, once.
#
#   infra/build_llamacpp_wheel.sh          -> prints the cached wheel path
#
# The build takes 9-11 minutes on 2 cores (see shared/STACK.md); every later call finds the
# cached wheel and returns at once. The wheel is CPU-only and portable (GGML_NATIVE=OFF).
#
# Env: AUTOIF_CACHE (default ~/.cache/autoif), AUTOIF_PYTHON (the interpreter whose ABI the
# wheel is built with; default /work/main/.venv/bin/python, else python3),
# LLAMACPP_VERSION (default 0.3.36).
set -euo pipefail

CACHE="${AUTOIF_CACHE:-$HOME/.cache/autoif}"
WHEELS="$CACHE/wheels"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -n "${AUTOIF_PYTHON:-}" ]]; then
  PY="$AUTOIF_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"
else
  PY="$(command -v python3)"
fi
mkdir -p "$WHEELS"

find_wheel() {
  ls -1 "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true
}

whl="$(find_wheel)"
if [[ -n "$whl" ]]; then
  echo "$whl"
  exit 0
fi

# One builder at a time (CI jobs or two fixtures may race).
exec 9>"$WHEELS/.llamacpp-build.lock"
flock 9
whl="$(find_wheel)"
if [[ -n "$whl" ]]; then
  echo "$whl"
  exit 0
fi

tmp="$(mktemp -d "$WHEELS/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "building llama-cpp-python==$VERSION wheel (about 10 minutes on 2 cores)..." >&2
start=$(date +%s)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
  -w "$tmp" "llama-cpp-python==$VERSION" >&2
built="$(ls -1 "$tmp"/llama_cpp_python-*.whl | head -n1)"
mv "$built" "$WHEELS/"
echo "built in $(( $(date +%s) - start )) s" >&2
find_wheel
