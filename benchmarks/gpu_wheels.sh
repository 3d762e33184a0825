#!/usr/bin/env bash
# Before a GPU session, on the development machine: fetch the wheels the GPU machine's python3 lacks
# (it has torch, lightning, torchmetrics and timm; no network there) at the versions this
# checkout's environment runs, into .whl/ (git-ignored), for the device tool's `carry`.
#   bash benchmarks/gpu_wheels.sh            # fetch into .whl/ (pure-Python wheels, any platform)
#   bash benchmarks/gpu_wheels.sh --list     # print NAME==VERSION, fetch nothing
# Then each device call carries [".whl"] and starts with (BENCHMARKS.md, "What is left"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# diffusers, omegaconf, submitit, facenet-pytorch: the stack; torch-fidelity: FID's Inception;
# importlib_metadata (and lazy-importer, which it imports): diffusers lists it.
specs=$("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
names = ["diffusers", "omegaconf", "submitit", "facenet-pytorch", "torch-fidelity", "importlib_metadata",
         "lazy-importer"]
missing = []
for name in names:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    raise SystemExit(f"gpu_wheels.sh: not installed here: {', '.join(missing)} (run make install first)")
EOF
)
if [ "${1:-}" = "--list" ]; then
  echo "$specs"
  exit 0
fi
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl $specs
ls -1 .whl
