#!/usr/bin/env bash
# Build and check gankern against a CUDA build of torch from the package registry, on a machine
# with or without a GPU (CI runs this for torch 2.13.0 and 2.11.0).
#
#   bash tools/cuda_torch_env.sh VERSION [pytest args...]
#
# 1. a virtual environment outside the repo, $GANKERN_CI_CACHE/cu-VERSION (default
#    ~/.cache/gankern-ci; kept between runs), with torch==VERSION from the registry: pip runs with the
#    machine's pip config bypassed (it may point at a local CPU wheel), so it gets the registry's
#    default Linux wheel, a CUDA build, with its pip `nvidia` libraries and its Triton;
# 2. gankern built into it with nvcc for sm_80 and sm_90 (override: TORCH_CUDA_ARCH_LIST), its own
#    build folder in the cache (incremental);
# 3. import check (the CUDA kernels must be in the build), then pytest with GANKERN_EXPECT_CUDA=1
#    (tests/test_build.py then requires a CUDA kernel for every internal op) and the given args.
# nvcc: on PATH or in /usr/local/cuda/bin.  Needs the network only for the first install.
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${1:?usage: tools/cuda_torch_env.sh TORCH_VERSION [pytest args...]}; shift
cache=${GANKERN_CI_CACHE:-$HOME/.cache/gankern-ci}
venv="$cache/cu-$ver"
py="$venv/bin/python"
t0=$SECONDS
say() { echo "[cuda-torch $ver] $*" >&2; }

deps=("scikit-build-core>=0.10" ninja "pybind11>=2.12" scikit-learn matplotlib pillow tqdm pytest pytest-benchmark
      pytest-xdist hypothesis)
# Triton 3.6 (torch 2.11's) interprets kernels with numpy APIs that numpy 2.4 removed (see README "Supported versions")
case "$ver" in 2.11.*) deps+=("numpy<2.4") ;; *) deps+=(numpy) ;; esac
stamp="$venv/.gankern-deps-$(printf '%s\n' "${deps[@]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  say "creating $venv (torch==$ver from the registry, its CUDA build)"
  [ -x "$py" ] || python3 -m venv "$venv"
  # bypass the user/site pip config (a local CPU wheel) so pip takes the registry's CUDA torch
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$py" -m pip install -q --disable-pip-version-check "torch==$ver" "${deps[@]}"
  touch "$stamp"
fi
"$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $venv is not a CUDA build')"
say "torch $("$py" -c 'import torch, triton, numpy; print(torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)') ($((SECONDS - t0)) s)"

t1=$SECONDS
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export PATH="$PATH:/usr/local/cuda/bin"
say "building gankern for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
rm -f gankern/_C*.so
# one build folder per torch version and checkout (a CMake cache belongs to one source folder)
bdir="$cache/build-$ver-$(pwd -P | cksum | cut -d' ' -f1)"
blog="$bdir.log"
if ! "$py" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps \
     -C build-dir="$bdir" -e . >"$blog" 2>&1; then
  tail -40 "$blog" >&2; say "build failed (log: $blog)"; exit 1
fi
grep -E -- "-- gankern: " "$blog" | sed 's/^ *-- */  /' >&2 || true
"$py" -c "
import gankern, gankern._C as C, sys
if not C.with_cuda: sys.exit('gankern._C has no CUDA kernels: ' + C.cuda_skip_reason)
print('  import ok: CUDA kernels for', C.cuda_archs, '| cuda backend:', gankern.backends()['cuda']['reason'] or 'available')
" >&2
say "build + import: $((SECONDS - t1)) s"

t2=$SECONDS
GANKERN_EXPECT_CUDA=1 "$venv/bin/pytest" -q -p no:cacheprovider "$@"
say "tests: $((SECONDS - t2)) s (all: $((SECONDS - t0)) s)"
