"""On/off options of the command-line scripts mean what they say: ``--flag false`` (the lowercase word, which
python-fire passes on as the truthy string 'false') is off, ``--flag true`` is on, through the real entry points
(subprocesses), each checked by an effect that differs between the two."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import fire
import pytest
from conftest import REPO_ROOT

from custom.flags import argparse_bool, bool_parameters, coerce_bools, fire_cli

SCRIPTS = REPO_ROOT / "bundle" / "scripts"
# Scripts being rewritten in concurrent changes; each switches to fire_cli there (then leaves this set).
PENDING_FIRE_CLI: set = set()


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def _switches(a: bool, b: bool | None = None, c=False, d: int = 0, e: str = "x"):
    return a, b, c, d, e


def test_bool_parameters_are_the_annotated_or_bool_defaulted_ones():
    assert bool_parameters(_switches) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "words,expected",
    [
        (["--a", "false", "--b", "no", "--c", "0"], (False, False, False)),
        (["--a", "true", "--b", "YES", "--c", "on"], (True, True, True)),
        (["--a", "False", "--c", "True"], (False, None, True)),  # fire's own Python literals still work
        (["--a", "--noc"], (True, None, False)),  # fire's bare-flag syntax
    ],
)
def test_fire_cli_reads_every_switch_with_as_bool(words, expected):
    result = fire_cli(_switches, command=words + ["--d", "1"])
    assert result[:3] == expected and result[3:] == (1, "x")


def test_fire_cli_refuses_an_unknown_word_and_keeps_the_signature_for_help():
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        fire_cli({"go": _switches}, command=["go", "--a", "maybe"])
    assert fire.inspectutils.GetFullArgSpec(coerce_bools(_switches)).args == ["a", "b", "c", "d", "e"]
    with pytest.raises(Exception, match="expected true or false"):
        argparse_bool("maybe")


def test_every_fire_script_starts_through_fire_cli():
    """A script calling ``fire.Fire`` itself would take ``--flag false`` as on again."""
    files = sorted(SCRIPTS.glob("*.py")) + sorted((REPO_ROOT / "custom").rglob("*.py"))
    direct = [f.name for f in files if re.search(r"\bfire\.Fire\(", f.read_text()) and f.name != "flags.py"]
    assert sorted(set(direct) - PENDING_FIRE_CLI) == []


@pytest.mark.parametrize("paper", ["false", "true"])
def test_run_ablations_merges_paper_yaml_only_when_asked(paper, tmp_path):
    out = _run(
        SCRIPTS / "run_ablations.py",
        "--dry_run",
        "true",
        "--paper",
        paper,
        "--variants",
        "plain_moco",
        "--out_dir",
        tmp_path / "ablations",
    )
    assert out.returncode == 0, out.stderr
    if paper == "true":
        assert "configs: train.yaml, paper.yaml, ablation.yaml" in out.stdout
        assert "of batch 128, order landmark, 1 queue(s) of K = 4096" in out.stdout
    else:
        assert "configs: train.yaml, ablation.yaml\n" in out.stdout and "paper.yaml" not in out.stdout
        assert "120 iterations (3 epochs x 40) of batch 16, order mixed, 1 queue(s) of K = 16" in out.stdout
    assert not (tmp_path / "ablations").exists()  # a dry run trains and writes nothing


@pytest.mark.parametrize("strict,returncode", [("false", 0), ("true", 1)])
def test_prepare_strict_false_does_not_fail_the_run(strict, returncode, tmp_path):
    (tmp_path / "cohort.csv").write_text("subject_id,image\ns1,\n")  # a subject with no image: fails at once
    out = _run(
        SCRIPTS / "prepare.py",
        "run",
        "--source",
        "cohort.csv",
        "--cache_dir",
        "cache",
        "--strict",
        strict,
        "--progress",
        "false",
        cwd=tmp_path,
    )
    assert out.returncode == returncode, out.stderr[-2000:]
    assert re.search(r"^failed:\s+1$", out.stdout, re.M) or "'failed': 1" in out.stdout, out.stdout


@pytest.mark.parametrize("progress", ["false", "true"])
def test_generate_demo_cohort_progress_false_prints_no_bar(progress, tmp_path):
    out = _run(
        SCRIPTS / "generate_demo_cohort.py",
        "--out_dir",
        tmp_path / "cohort",
        "--num_subjects",
        1,
        "--voxel_size",
        4,
        "--dicom_every",
        0,
        "--progress",
        progress,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("synthetic copd cohort" in out.stderr) == (progress == "true")


@pytest.mark.parametrize("same_landmark,line", [("false", "all different"), ("true", "one per batch")])
def test_benchmark_loc_condconv_same_landmark(same_landmark, line):
    out = _run(
        SCRIPTS / "benchmark_loc_condconv.py",
        "--batch_sizes",
        "[2]",
        "--repeats",
        1,
        "--modes",
        "[grouped]",
        "--threads",
        1,
        "--same_landmark",
        same_landmark,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"locations: {line};" in out.stdout


@pytest.mark.parametrize("zip_flag", ["false", "true"])
def test_export_bundle_zip_false_writes_no_zip(zip_flag, tmp_path):
    out = _run(SCRIPTS / "export_bundle.py", "--out_dir", tmp_path, "--zip", zip_flag, "--include_model", "false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert bool(list(tmp_path.glob("*.zip"))) == (zip_flag == "true")
    assert not (tmp_path / "drasclr_lung_ct" / "models" / "model.pt").exists()  # --include_model false
