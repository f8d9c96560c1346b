#!/usr/bin/env bash
# Format the tree as the Model Zoo's pre-merge checks want it (isort, then black; settings in pyproject.toml),
# then list what flake8 (.flake8) still reports. tests/test_code_format.py fails on any of the three.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/isort -q custom bundle tests tools
.venv/bin/black -q custom bundle tests tools
.venv/bin/flake8 custom bundle tests tools
