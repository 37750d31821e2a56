#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU box that has torch, torchvision, numpy and pillow but no
# network, as the lent H200 machine (docs/gpu.md): pydantic (the package validates job specs and builds the
# model config through it) and what pydantic needs, for CPython 3.12 on x86-64 Linux, pinned to the
# versions in this venv (what the tests ran with). pydantic-core is compiled (cp312 manylinux); the others
# are pure Python. About 2.5 MB in all.
#
#   bench/gpu_wheels.sh [DEST]    download them into DEST (default .whl/, git-ignored)
#   bench/gpu_wheels.sh --list    print the pinned requirements only
#
# Then, on the box: python3 -m pip install --no-index --no-deps --target /tmp/site DEST/*.whl and
# PYTHONPATH=/tmp/site (docs/gpu.md has the whole command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${1:-.whl}
NAMES="pydantic pydantic-core annotated-types typing-inspection typing-extensions"

reqs=$("$PY" - $NAMES <<'PYEOF'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    print(f"{name}=={metadata.version(name)}")
PYEOF
)
if [ "$DEST" = "--list" ]; then
  echo "$reqs"
  exit 0
fi
mkdir -p "$DEST"
# one version of each: a second copy of a package stops the whole install there
for name in $NAMES; do
  rm -f "$DEST/${name//-/_}"-*.whl
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $reqs
ls -l "$DEST"
