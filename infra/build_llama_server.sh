#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (continuous batching, --parallel slots) once, from the llama.cpp
# sources that PyPI's llama-cpp-python sdist vendors, into $AUTOIF_CACHE/bin/llama-server; print its path.
# About 10 minutes on 2 cores. Used by benchmarks/parallel.py (a server with 2 parallel slots); the embedded
# default and the tests use llama-cpp-python instead.
set -euo pipefail
CACHE="${AUTOIF_CACHE:-$HOME/.cache/autoif}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${AUTOIF_PYTHON:-$(dirname "$HERE")/.venv/bin/python}"
VERSION="${AUTOIF_LLAMACPP_VERSION:-0.3.36}"
OUT="$CACHE/bin/llama-server"
if [[ -x "$OUT" ]]; then echo "$OUT"; exit 0; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$(dirname "$OUT")"
install -m 755 "$WORK/build/bin/llama-server" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "$OUT"
