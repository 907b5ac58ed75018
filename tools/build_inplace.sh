#!/usr/bin/env bash
# Development build: compiles gankern/_C*.so next to the sources (no pip install needed;
# run tests with PYTHONPATH=. or from the repo root). Usage: tools/build_inplace.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
cmake -S . -B build/inplace -G Ninja -DGANKERN_INPLACE=ON -DPython_EXECUTABLE="$PY" >/dev/null
cmake --build build/inplace -j 2
