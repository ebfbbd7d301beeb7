#!/usr/bin/env bash
# Build the wheel, install it into a clean virtualenv outside the checkout, and run the CLI there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip wheel -q --no-deps . -w "$WORK/dist"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0          # the CPU wheel first: nothing may pull CUDA torch
"$PY" -m pip install -q "$WORK"/dist/lpcompile-*.whl
cd "$WORK"                                       # outside the checkout: only the wheel is importable
"$PY" - <<PYEOF
import lpcompile, lpcompile.passes.pipeline, lpcompile.runtime.ort
assert "$ROOT" not in lpcompile.__file__, lpcompile.__file__
print("wheel imports from", lpcompile.__file__)
PYEOF
"$WORK/venv/bin/lpcompile" --help >/dev/null
"$WORK/venv/bin/lpcompile" demo --out "$WORK/demo" -q
test -s "$WORK/demo/digits_mlp.lp.onnx" && test -s "$WORK/demo/digits_mlp.lp.plan.json"
echo "wheel check passed: lpcompile --help and lpcompile demo ran from a clean virtualenv"
