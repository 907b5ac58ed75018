#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, its own torch + Triton + nvcc, and no network:
#   bash tools/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check/; PYTHON=... picks the interpreter)
# 1. builds gankern._C in place (CMake + ninja, no pip) for this device's arch only;
# 2. runs every `gpu`-marked test (pytest -m gpu) on the device;
# 3. benchmarks on the device with CUDA events (bench/gpu_bench.py): each op fwd+bwd at GAN shapes and a
#    large shape (gankern cuda / triton vs eager vs torch.compile), the MLP and DCGAN training steps
#    (gankern vs the tuned plain loop, each also replayed from a CUDA graph).
# Prints one table last and writes OUT_DIR/gpu_check.json, OUT_DIR/tests.log, OUT_DIR/build.log.
# Exit status: non-zero if the build or any gpu test failed.  Budget: ~8 minutes on an H200 (16 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu_check}
mkdir -p "$OUT"
t0=$SECONDS
say() { echo "[gpu-check] $*" >&2; }

cc=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('%d%d' % torch.cuda.get_device_capability())") \
  || { say "error: no CUDA device visible to $PY (torch.cuda.is_available() is False)"; exit 2; }
say "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)') | sm_$cc"
export PATH="$PATH:/usr/local/cuda/bin"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
say "building gankern._C for sm_$cc (log: $OUT/build.log)"
rm -f gankern/_C*.so
if ! { cmake -S . -B build/gpu-check "${gen[@]}" -DGANKERN_INPLACE=ON -DGANKERN_CUDA_ARCHS="${cc}-real" \
         -DPython_EXECUTABLE="$(command -v "$PY")" && cmake --build build/gpu-check -j "$(nproc)"; } >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log" >&2; say "build failed"; exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import gankern._C as C, sys; sys.exit(0 if C.with_cuda else 'built without CUDA kernels: ' + C.cuda_skip_reason)" || exit 1
say "build: $((SECONDS - t0)) s"

t1=$SECONDS
# TRITON_INTERPRET=0: the test suite otherwise runs Triton in its CPU interpreter
TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
say "gpu tests: exit $tests_rc, $((SECONDS - t1)) s"

t2=$SECONDS
TRITON_INTERPRET=0 "$PY" bench/gpu_bench.py --json "$OUT/gpu_check.json" ${GANKERN_GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
say "benchmarks: exit $bench_rc, $((SECONDS - t2)) s; all: $((SECONDS - t0)) s"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
