#!/usr/bin/env bash
# One entry point that does its own set-up on a fresh clone (virtual env in .venv, torch==2.13.0,
# the package built against it with --no-build-isolation), then runs a job:
#   bash run.sh demo    # the main job: train the MLP GAN on the embedded digits (CPU, ~2-3 min)
#   bash run.sh test    # the whole test suite
#   bash run.sh bench   # the benchmarks -> bench/results/ (JSON, markdown, PNG)
#   bash run.sh setup   # set-up only
# Extra arguments go to the job (e.g. bash run.sh test -k bce).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${GANKERN_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.gankern-deps"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ run.sh -nt "$stamp" ]; then
    echo "[setup] installing torch==2.13.0 and the build/test/train dependencies into $VENV" >&2
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$PY" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" ninja "pybind11>=2.12" numpy \
      triton scikit-learn matplotlib pillow tqdm pytest pytest-benchmark pytest-xdist hypothesis \
      2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$PY" -c "import torch, triton, skbuild_core" 2>/dev/null || "$PY" -c "import torch, triton, scikit_build_core" \
      || { echo "[setup] dependency install failed" >&2; exit 1; }
    touch "$stamp"
  fi
  echo "[setup] building gankern (C++ extension, incremental)" >&2
  rm -f gankern/_C*.so   # a stale in-place development build would shadow the installed one
  "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$VENV/build.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$VENV/build.log" | tail -40 >&2; echo "[setup] build failed (log: $VENV/build.log)" >&2; exit 1; }
  grep -E -- "-- gankern: " "$VENV/build.log" | sed 's/^ *-- /[setup] /' | sort -u >&2 || true
  "$PY" -c "import gankern._C" || { echo "[setup] building the extension failed" >&2; exit 1; }
}

job=${1:-demo}; shift || true
case "$job" in
  setup) setup ;;
  demo)  setup; exec "$PY" -m gankern train --demo "$@" ;;
  test)  setup; exec "$VENV/bin/pytest" -q "$@" ;;
  bench) setup; exec "$PY" bench/run.py "$@" ;;
  *) echo "usage: bash run.sh demo|test|bench|setup [args...]" >&2; exit 2 ;;
esac
