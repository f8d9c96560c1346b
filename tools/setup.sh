#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install the bundle's stack into it. Idempotent: a second run is quick.
# CPU build of torch by default; for a GPU, first install a CUDA build of the same torch version into .venv
# (e.g. `.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.drasclr-installed
want=$(cat pyproject.toml | sha1sum | cut -c1-40)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an unpinned request could pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
