#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python bundle/scripts/demo.py "$@"
