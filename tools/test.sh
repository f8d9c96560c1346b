#!/usr/bin/env bash
# Set up (if needed) and run the test suite.
#   bash tools/test.sh           the default suite: everything not marked slow (0.5.0, fresh clone, 2 cores:
#                                11.5 min of pytest, 13.5 min with the setup, the demo running beside it part
#                                of the time)
#   bash tools/test.sh --all     also the slow tests (demo-cohort training, export round trips, MONAI Label in its
#                                own venv, torchrun runs of prepare/embed/inference, damaged real CTs): 33.5 min of
#                                pytest (375 tests) in a fresh clone of 0.6.0 on 2 cores, the demo running beside it
#                                for the first half (42 min with the setup); CI runs this
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k emphysema`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
marker=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
    marker=()
    shift
fi
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "${marker[@]}" "$@"
