"""The Model Zoo's code-format gate (black, isort, flake8 at 120 columns, its plugin set) over the whole tree.

The Zoo runs these tools on a bundle before it merges it; the configuration is in pyproject.toml and .flake8.
`bash tools/format.sh` fixes what black and isort can fix."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SOURCES = ["custom", "bundle", "tests", "tools"]  # the project's Python; never the virtual environments beside it
GATES = {
    "black": [sys.executable, "-m", "black", "--check", "--quiet", *SOURCES],
    "isort": [sys.executable, "-m", "isort", "--check-only", "--quiet", *SOURCES],
    "flake8": [sys.executable, "-m", "flake8", *SOURCES],
}


@pytest.mark.parametrize("tool", sorted(GATES))
def test_tree_passes_the_model_zoo_format_gate(tool):
    done = subprocess.run(GATES[tool], cwd=REPO, capture_output=True, text=True)
    report = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, f"{tool} rejects the tree (run `bash tools/format.sh`):\n{report[-4000:]}"


def test_the_gate_catches_a_regression(tmp_path):
    """The same settings reject a badly formatted file (so a passing gate is not a gate that checks nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os,sys\ndef f(x = [ ]) :\n    return  x\n")
    for tool in ("black", "isort", "flake8"):
        args = [a for a in GATES[tool] if a not in SOURCES] + [str(bad)]
        if tool != "flake8":
            args.insert(
                -1,
                (
                    f"--settings-path={REPO / 'pyproject.toml'}"
                    if tool == "isort"
                    else f"--config={REPO / 'pyproject.toml'}"
                ),
            )
        else:
            args.insert(-1, f"--config={REPO / '.flake8'}")
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        assert done.returncode != 0, f"{tool} accepted a badly formatted file"
